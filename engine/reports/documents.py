"""Which document a report message carries, as keys the queue can order and cancel by.

A document's versions share a chain: the CDA ``setId`` (CDA R2, "ClinicalDocument.setId": the
same for every version of a document), or, when the sender leaves it out (the ANS example
messages do), the id of the version each one replaces (``relatedDocument/parentDocument``,
TXA-12 / the CI-SIS "Transmission de documents CDA en HL7 v2" replacement and deletion rules).
A PACS report has no CDA before the engine builds one: its exam (accession number, else order
id) stands for the chain.

Keys are truncated SHA-256 hashes, like the ordering keys: the queue never holds identifiers in
clear. Pure: the chain lookup of earlier versions is done by the store, in the writer's
transaction (:meth:`engine.store.Store.document_chain_key`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]


@dataclass(frozen=True)
class DocumentRefs:
    action: str | None        # initial | replace | delete
    doc_id: str | None        # hash of this version's id
    earlier: tuple[str, ...]  # hashes of the ids whose chain this version joins (newest first)
    own_key: str              # the chain key when no earlier version is known


def document_refs(submission, exam_key: str | None = None) -> DocumentRefs | None:
    """The chain references of the first document of a canonical submission (None: no document
    and no exam key)."""
    docs = getattr(submission, "documents", None) or []
    action = getattr(submission, "action", None)
    if not docs:
        if exam_key:
            return DocumentRefs(action, None, (), short_hash("exam:" + exam_key))
        return None
    d = docs[0]
    parent = d.replaces or getattr(submission, "parent_document_id", None)
    earlier: list[str] = []
    if action == "delete" and d.id:
        earlier.append(short_hash("id:" + d.id))  # the version being deleted
    if parent and action in ("replace", "delete"):
        earlier.append(short_hash("id:" + parent))
    if d.set_id:
        own = short_hash("set:" + d.set_id)
    elif exam_key:
        own = short_hash("exam:" + exam_key)
    elif parent and action in ("replace", "delete"):
        own = short_hash("id:" + parent)  # equals the original's key when it had no setId
    elif d.id:
        own = short_hash("id:" + d.id)
    else:
        return None
    return DocumentRefs(action, short_hash("id:" + d.id) if d.id else None, tuple(earlier), own)
