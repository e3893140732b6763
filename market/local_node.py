"""``market up --node``: the local provider node joins the way any provider's machine does.

The CLI has the database at hand, so it plays the provider here: it keeps one provider named
"local", mints a one-time enrolment token, lists the node's model in the catalog (with demo prices
if the marketplace has no price book yet); the node
then runs ``python -m nodes join`` with that token, enrols through the api and logs into NATS
with its own nkey.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from market import db, keys
from market.ids import new_id
from market.models import EnrolmentToken, Model, PriceBook, Provider
from market.models.billing import PriceSpec, create_price_book
from market.settings import Settings

LOCAL_PROVIDER = "local"
SIM_MODEL = ("sim-llama-3-8b", 8192)
TINY_MODEL = ("tiny-random-llama", 2048)
DEMO_PRICE = (15, 60)
"""Minor units per 1M input and output tokens (0.15 and 0.60 USD) for a fresh local marketplace."""
DEMO_SLOT_HOUR = 5
"""Minor units per reserved slot per hour (0.05 USD): reservations are possible out of the box."""


def served_model(engine: str, model_dir: Path | None) -> tuple[str, int]:
    """The marketplace name and context the local node will serve (the node agrees by construction)."""
    if engine == "sim":
        return SIM_MODEL
    if model_dir is None:
        return TINY_MODEL
    context = 2048
    config = model_dir / "config.json"
    if config.exists():
        context = min(2048, int(json.loads(config.read_text()).get("max_position_embeddings", 2048)))
    return model_dir.name, context


async def prepare(settings: Settings, engine: str, model_dir: Path | None) -> str:
    """Provider, catalog entry and a one-time enrolment token for the local node."""
    name, context = served_model(engine, model_dir)
    eng = db.create_engine(settings, pool_size=1, max_overflow=0)
    try:
        async with db.session_factory(eng)() as session, session.begin():
            provider = await session.scalar(select(Provider).where(Provider.name == LOCAL_PROVIDER))
            if provider is None:
                provider = Provider(id=new_id("provider"), name=LOCAL_PROVIDER)
                session.add(provider)
                await session.flush()
            if await session.get(Model, name) is None:
                session.add(Model(name=name, context_length=context, owned_by=LOCAL_PROVIDER))
                await session.flush()
            if await session.scalar(select(PriceBook.id).limit(1)) is None:
                # A fresh local marketplace gets demo prices so its usage is rated from the start;
                # a platform admin replaces them with POST /api/admin/prices.
                await create_price_book(
                    session,
                    currency=settings.currency,
                    effective_from=datetime.now(UTC),
                    platform_margin_bps=2000,
                    note="demo prices from market up",
                    prices=[
                        PriceSpec(
                            model=name,
                            admission_class=c,
                            input_minor_per_million=DEMO_PRICE[0],
                            output_minor_per_million=DEMO_PRICE[1],
                            reservation_hour_minor=DEMO_SLOT_HOUR if c == "reserved" else None,
                        )
                        for c in ("reserved", "burst", "on_demand")
                    ],
                )
            secret, digest, _ = keys.generate("enrolment")
            session.add(
                EnrolmentToken(
                    id=new_id("enrolment"),
                    provider_id=provider.id,
                    secret_hash=digest,
                    expires_at=datetime.now(UTC) + timedelta(hours=1),
                )
            )
        return secret
    finally:
        await eng.dispose()
