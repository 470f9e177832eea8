"""Registry lookups for code outside the writer (transforms, report steps): one read each."""
from __future__ import annotations


def make_identity_lookup(store):
    """``lookup(ipp, authority=None, *, ins=None) -> dict | None`` (``IdentityView.to_json()``)."""

    def lookup(ipp=None, authority=None, *, ins=None):
        from engine.identity.registry import find_identity

        def q(conn):
            if ins:
                view = find_identity(conn, ins=ins)
            else:
                view = find_identity(conn, ipp=ipp, ipp_authority=authority)
            return view.to_json() if view is not None else None

        return store.read(q)

    return lookup
