"""``/api/admin/models``: the catalog of models tenants can call (platform admins change it)."""

from __future__ import annotations

from litestar import Controller, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy import select

from api import reservations
from api.admin.schemas import ModelCreate, ModelOut, ModelUpdate, is_set
from api.auth import Principal, require_platform_admin
from api.errors import Conflict, NotFound
from api.state import AppState
from market.models import Model


def model_out(model: Model) -> ModelOut:
    return ModelOut(
        name=model.name,
        context_length=model.context_length,
        owned_by=model.owned_by,
        active=model.active,
        created_at=model.created_at,
    )


class ModelController(Controller):
    path = "/models"
    tags = ["admin: models"]

    @post("/", guards=[require_platform_admin])
    async def create(self, app_state: NamedDependency[AppState], data: JSONBody[ModelCreate]) -> ModelOut:
        async with app_state.sessions.begin() as session:
            if await session.get(Model, data.name) is not None:
                raise Conflict(f"the model '{data.name}' is already in the catalog", code="model_exists")
            model = Model(
                name=data.name, context_length=data.context_length, owned_by=data.owned_by, active=data.active
            )
            session.add(model)
            await session.flush()
            await session.refresh(model)
            return model_out(model)

    @get("/")
    async def list_models(self, app_state: NamedDependency[AppState]) -> list[ModelOut]:
        async with app_state.sessions() as session:
            return [model_out(m) for m in (await session.scalars(select(Model).order_by(Model.name))).all()]

    @patch("/{name:path}", guards=[require_platform_admin])
    async def update(
        self,
        app_state: NamedDependency[AppState],
        principal: NamedDependency[Principal],
        name: FromPath[str],
        data: JSONBody[ModelUpdate],
    ) -> ModelOut:
        """Change context length or owner, or retire a model (``active: false``) without deleting it.

        Retiring ends every reservation of the model: nobody can call it any more."""
        async with app_state.sessions.begin() as session:
            model = await session.get(Model, name.lstrip("/"), with_for_update={"key_share": True})
            if model is None:
                raise NotFound("model not found", code="model_not_found")
            if data.active is False and model.active:
                await reservations.end_all(session, principal.key_id, model=model.name)
            for field in data.__struct_fields__:
                value = getattr(data, field)
                if is_set(value):
                    setattr(model, field, value)
            await session.flush()
            await session.refresh(model)
            return model_out(model)
