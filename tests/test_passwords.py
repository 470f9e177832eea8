"""Password hashes: argon2id PHC strings, a fresh salt each time, wrong or malformed input never
verifies and never raises, old parameters ask for a rehash."""
from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from engine.passwords import hash_password, needs_rehash, verify_password


def test_hash_is_argon2id_salted_and_verifies():
    h1, h2 = hash_password("correct horse"), hash_password("correct horse")
    assert h1.startswith("$argon2id$v=19$") and h1 != h2          # fresh salt
    assert "correct horse" not in h1
    assert verify_password(h1, "correct horse") and verify_password(h2, "correct horse")
    assert not verify_password(h1, "correct horsE")
    assert not verify_password(h1, "")
    assert not needs_rehash(h1)


@pytest.mark.parametrize("bad", ["", "garbage", "$argon2id$", "$argon2id$v=19$m=65536,t=3,p=4$abc",
                                 "$2b$12$abcdefghijklmnopqrstuuJ1vYw1Zp6Q3k9n3QGQ4xq6C5l0W3m6y",
                                 "$argon2id$v=19$m=x,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g", None, 42])
def test_malformed_hash_is_false_not_an_exception(bad):
    assert verify_password(bad, "pw") is False
    assert needs_rehash(bad) is True


def test_wrong_types_and_empty_password():
    h = hash_password("pw")
    assert verify_password(h, None) is False
    with pytest.raises(ValueError):
        hash_password("")


def test_weaker_parameters_need_a_rehash():
    old = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    assert verify_password(old, "pw")          # still accepted...
    assert needs_rehash(old)                   # ...but to be upgraded at the next login
