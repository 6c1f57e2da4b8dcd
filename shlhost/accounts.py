"""Accounts and API tokens. No Flask: callers pass the session and the password hasher."""

from __future__ import annotations

import re
from datetime import datetime

from argon2 import PasswordHasher
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shlhost.crypto.keys import new_token, token_hash
from shlhost.crypto.passcodes import hash_secret, verify_secret
from shlhost.errors import BadRequest, Conflict
from shlhost.storage.models import Account, ApiToken

EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{2,63}")
PASSWORD_MIN = 8
# API tokens carry a prefix so that leaked tokens are easy to recognise and scan for.
TOKEN_PREFIX = "shl_"  # noqa: S105 - a public prefix, not a secret


def normalise_email(email: str) -> str:
    email = (email or "").strip().lower()
    if "\x00" in email or not EMAIL_RE.fullmatch(email):
        raise BadRequest("that is not an email address", code="invalid_email")
    return email


def create_account(
    session: Session, ph: PasswordHasher, email: str, password: str, *, now: datetime
) -> Account:
    email = normalise_email(email)
    if len(password or "") < PASSWORD_MIN:
        raise BadRequest(
            f"a password needs at least {PASSWORD_MIN} characters", code="weak_password"
        )
    account = Account(email=email, password_hash=hash_secret(ph, password), created_at=now)
    session.add(account)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("an account with that email exists", code="account_exists") from None
    return account


def find_account(session: Session, email: str) -> Account | None:
    return session.scalars(select(Account).where(Account.email == email.strip().lower())).first()


def check_password(
    session: Session, ph: PasswordHasher, email: str, password: str
) -> Account | None:
    account = find_account(session, email)
    if account is None:
        # Spend the same time as a real check, so timing does not reveal which emails exist.
        verify_secret(
            ph, _DUMMY_HASHES.setdefault(id(ph), hash_secret(ph, "not-a-password")), password
        )
        return None
    return account if verify_secret(ph, account.password_hash, password) else None


_DUMMY_HASHES: dict[int, str] = {}


def create_token(
    session: Session, account: Account, *, label: str | None = None, now: datetime
) -> str:
    token = TOKEN_PREFIX + new_token(32)
    session.add(
        ApiToken(account_id=account.id, token_hash=token_hash(token), label=label, created_at=now)
    )
    session.commit()
    return token


def account_for_token(session: Session, token: str | None) -> int | None:
    """The account an API token belongs to; None for anything else (incl. revoked tokens).

    Lookup is by the token's SHA-256, an exact index match: no secret is compared by hand.
    """
    if not token or not token.startswith(TOKEN_PREFIX):
        return None
    row = session.execute(
        select(ApiToken.account_id).where(
            ApiToken.token_hash == token_hash(token), ApiToken.revoked_at.is_(None)
        )
    ).first()
    return row.account_id if row else None
