"""Platform-admin keys from the command line (bootstrap on first ``market up``, ``market admin``)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from market import db, keys
from market.ids import new_id
from market.models import ApiKey
from market.settings import Settings


async def create_platform_admin_key(settings: Settings, name: str = "platform admin") -> str:
    """Insert a new platform-admin key and return its secret (the only time it is visible)."""
    engine = db.create_engine(settings, pool_size=1, max_overflow=0)
    try:
        async with db.session_factory(engine)() as session, session.begin():
            secret, hashed, prefix = keys.generate("platform_admin")
            session.add(
                ApiKey(
                    id=new_id("key"),
                    role="platform_admin",
                    name=name,
                    prefix=prefix,
                    secret_hash=hashed,
                    scopes=["admin"],
                )
            )
        return secret
    finally:
        await engine.dispose()


async def bootstrap_admin_key(settings: Settings, key_file: Path) -> str | None:
    """On the first start, create the platform-admin key and write it to ``key_file`` (0600).

    Returns the new secret, or None when an admin key already exists (it is never shown again).
    """
    engine = db.create_engine(settings, pool_size=1, max_overflow=0)
    try:
        async with db.session_factory(engine)() as session:
            existing = await session.scalar(
                select(func.count()).select_from(ApiKey).where(ApiKey.role == "platform_admin")
            )
    finally:
        await engine.dispose()
    if existing:
        return None
    secret = await create_platform_admin_key(settings, name="bootstrap")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600, exist_ok=True)
    key_file.chmod(0o600)
    key_file.write_text(secret + "\n")
    return secret
