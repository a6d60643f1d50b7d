"""What the SCIM endpoint serves (services.goals.scim): its resource models, the service
description it publishes, and how a read-model row becomes a SCIM resource.

The models are scim2-models' own: `User` with the enterprise extension for people and `Group`
for org units, with Tandem's unit extension (the unit's kind and its parent group). A person
is a User, a unit a Group; a group's members are the people whose unit it is now, and a user's
one group is their unit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field
from scim2_models import (
    URN,
    AuthenticationScheme,
    Bulk,
    CaseExact,
    ChangePassword,
    ComplexAttribute,
    Email,
    EnterpriseUser,
    ETag,
    Extension,
    Filter,
    Group,
    GroupMember,
    GroupMembership,
    Manager,
    Meta,
    Mutability,
    Name,
    Pagination,
    Patch,
    Reference,
    Required,
    ResourceType,
    ScimPolicy,
    ScimProvider,
    ServiceProviderConfig,
    Sort,
    User,
)

from services.goals.domain import UnitKind

SCIM_PREFIX = "/scim/v2"
SCIM_JSON = "application/scim+json"
UNIT_EXTENSION = "urn:tandem:params:scim:schemas:extension:unit:2.0:Group"

MAX_OPERATIONS = 1000
MAX_PAYLOAD_SIZE = 1_048_576
MAX_RESULTS = 200
DEFAULT_PAGE_SIZE = 100


class UnitParent(ComplexAttribute):
    value: Annotated[str | None, Required.true, CaseExact.true] = None
    """The id of the parent group (the unit this one hangs under)."""

    ref: Reference[Group] | None = Field(None, serialization_alias="$ref", validation_alias="$ref")
    """The URI of the parent group."""

    display: Annotated[str | None, Mutability.read_only] = None
    """The parent group's displayName."""


class TandemUnit(Extension):
    """The org unit a group stands for: company, department or team, and the unit above it."""

    __schema__ = URN(UNIT_EXTENSION)

    kind: Annotated[UnitKind | None, Mutability.immutable] = None
    """company (the root of the tree: no parent), department or team. Set when the group is
    created (team under a parent, company without one, if left out); it never changes."""

    parent: UnitParent | None = None
    """The group this one hangs under; every group but a company has one."""


ScimUser = User[EnterpriseUser]
ScimGroup = Group[TandemUnit]
ScimResource = ScimUser | ScimGroup

SERVICE_PROVIDER_CONFIG = ServiceProviderConfig(
    patch=Patch(supported=True),
    bulk=Bulk(supported=True, max_operations=MAX_OPERATIONS, max_payload_size=MAX_PAYLOAD_SIZE),
    filter=Filter(supported=True, max_results=MAX_RESULTS),
    change_password=ChangePassword(supported=False),
    sort=Sort(supported=True),
    etag=ETag(supported=True),
    authentication_schemes=[AuthenticationScheme(
        type="oauthbearertoken", name="OAuth Bearer Token", primary=True,
        description="A bearer JWT with the hr_sync role (`make token ROLE=hr_sync` in development).")],
    pagination=Pagination(cursor=False, index=True, default_pagination_method="index",
                          default_page_size=DEFAULT_PAGE_SIZE, max_page_size=MAX_RESULTS),
)

USER_TYPE = ResourceType.from_resource(ScimUser).model_copy(update={
    "description": "A person of the organisation (a Tandem person)"})
GROUP_TYPE = ResourceType.from_resource(ScimGroup).model_copy(update={
    "description": "A company, department or team (a Tandem org unit)"})

# Strict, as the SCIM interoperability profile asks: an attribute or schema no model declares
# is refused (invalidSyntax / invalidValue) rather than dropped unseen.
POLICY = ScimPolicy()
PROVIDER = ScimProvider(models=[User, EnterpriseUser, Group, TandemUnit], resource_types=[USER_TYPE, GROUP_TYPE],
                        config=SERVICE_PROVIDER_CONFIG, policy=POLICY)


def weak_etag(version: int) -> str:
    """An aggregate's version as a weak ETag: the representation also shows other aggregates
    (a user's unit name and manager, a group's members), which do not move it."""
    return f'W/"{version}"'


class Locations:
    """Absolute URLs of resources, from the base URL the request came in on."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/") + SCIM_PREFIX

    def user(self, person_id: Any) -> str:
        return f"{self.base}/Users/{person_id}"

    def group(self, unit_id: Any) -> str:
        return f"{self.base}/Groups/{unit_id}"

    def of(self, resource_type: str, resource_id: Any) -> str:
        return f"{self.base}/{resource_type}s/{resource_id}"


def _meta(resource_type: str, row: Mapping[str, Any], location: str) -> Meta:
    created: datetime = row["created_at"]
    return Meta(resource_type=resource_type, created=created, last_modified=row["updated_at"],
                location=location, version=weak_etag(row["version"]))


def user_of(row: Mapping[str, Any], at: Locations) -> Any:
    """A person's row (with `unit_name` and `manager_name` joined in) as a SCIM User. People
    created over REST have no user name: their email stands for it."""
    unit_id, manager_id = row["unit_id"], row["manager_id"]
    user = ScimUser(
        id=str(row["id"]),
        external_id=row["external_id"],
        user_name=row["user_name"] or row["email"],
        name=Name(formatted=row["formatted_name"] or row["name"], given_name=row["given_name"],
                  family_name=row["family_name"]),
        display_name=row["name"],
        active=row["active"],
        # Not validated again: an address REST took (a reserved domain, say) is shown as stored.
        emails=[_email(e) for e in _json_list(row["emails"])],
        groups=[GroupMembership(value=str(unit_id), ref=at.group(unit_id), display=row["unit_name"], type="direct")],
        meta=_meta("User", row, at.user(row["id"])),
    )
    user[EnterpriseUser] = EnterpriseUser(
        department=row["unit_name"],
        manager=Manager(value=str(manager_id), ref=at.user(manager_id), display_name=row["manager_name"])
        if manager_id is not None else None)
    return user


def group_of(row: Mapping[str, Any], members: Sequence[Mapping[str, Any]] | None, at: Locations) -> Any:
    """A unit's row (with `parent_name` joined in) and its present members as a SCIM Group;
    `members` None leaves them out (not asked for)."""
    parent_id = row["parent_id"]
    group = ScimGroup(
        id=str(row["id"]),
        external_id=row["external_id"],
        display_name=row["name"],
        members=None if members is None else [
            GroupMember(value=str(m["id"]), ref=at.user(m["id"]), type="User", display=m["name"]) for m in members],
        meta=_meta("Group", row, at.group(row["id"])),
    )
    group[TandemUnit] = TandemUnit(
        kind=UnitKind(row["kind"]),
        parent=UnitParent(value=str(parent_id), ref=at.group(parent_id), display=row["parent_name"])
        if parent_id is not None else None)
    return group


def _email(entry: Mapping[str, Any]) -> Email:
    fields = dict(entry)
    if fields.get("type") is not None:
        fields["type"] = Email.Type(fields["type"])
    return Email.model_construct(**fields)


def _json_list(value: Any) -> list[dict[str, Any]]:
    """asyncpg hands jsonb over as text."""
    return json.loads(value) if isinstance(value, str) else list(value or [])
