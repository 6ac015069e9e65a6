"""The JSON API (/api/...): what the labeling page's script and other tools call.

It is described by the app's OpenAPI schema (/openapi.json), which the fuzz test drives. Every error is
{"error": "message"} with a 4xx status. State-changing calls need the X-CSRF-Token header.
"""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictBool, StrictInt

from rlhfkit.labelapp import assignment, project, stats
from rlhfkit.labelapp.assignment import AppError
from rlhfkit.labelapp.deps import (
    ApiLead,
    ApiUser,
    ApiUserCsrf,
    Conn,
    check_origin,
    session_token,
    set_session_cookie,
    sign_in,
)
from rlhfkit.labelapp.security import User, end_session

# SQLite integers are 64-bit; a larger id from a client must be a 422, not an OverflowError (found by
# the fuzz test).
MAX_ID = 2**63 - 1
AssignmentId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="one of your assignments")]


class SessionIn(BaseModel):
    name: str = Field(max_length=64)
    password: str = Field(max_length=256)


class SessionOut(BaseModel):
    name: str
    role: str
    csrf_token: str


# Positions and ids are StrictInt: pydantic's default (lax) mode would take "0", 0.0 and true as 0, 0, 1.


class Flag(BaseModel):
    position: StrictInt = Field(description="display position of the flagged completion")
    reason: Literal["unsafe", "nonsense", "other"]


class ThumbIn(BaseModel):
    position: StrictInt = Field(description="display position of the reply")
    label: StrictBool = Field(description="true = thumb up (desirable), false = thumb down")


class SubmissionIn(BaseModel):
    client_id: str = Field(description="new random id per submission (e.g. a UUID); a retry reuses it", max_length=64)
    assignment_id: StrictInt = Field(ge=1, le=MAX_ID)
    rankings: dict[str, list[list[StrictInt]]] | None = Field(
        default=None, description="ranking projects: per criterion, tie groups of display positions, best first")
    thumbs: dict[str, list[ThumbIn]] | None = Field(
        default=None, description="thumbs projects: per criterion, one thumb for every reply")
    strengths: dict[str, list[str]] | None = Field(
        default=None, description="per criterion: strength between adjacent ranks, when the project asks for it")
    flags: list[Flag] | None = None
    comment: str | None = Field(default=None, max_length=assignment.MAX_COMMENT)


class SubmissionOut(BaseModel):
    status: Literal["stored", "duplicate"]
    submission_id: int


class Completion(BaseModel):
    position: int
    text: str


class Progress(BaseModel):
    done: int
    skipped: int
    remaining: int


class AssignmentOut(BaseModel):
    assignment_id: int
    status: str
    prompt: str
    completions: list[Completion]


class NextOut(BaseModel):
    assignment: AssignmentOut | None = Field(description="null when nothing is left for you")
    mode: Literal["ranking", "thumbs"] = Field(description="what to submit: 'rankings' or 'thumbs'")
    criteria: list[str]
    ask_strength: bool
    strengths: list[str]
    progress: Progress


class Message(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Message} for code in (400, 401, 403, 404, 409, 422, 429)}

router = APIRouter(prefix="/api", tags=["api"], responses=ERRORS)


def require_settings(conn) -> project.ProjectSettings:
    settings = project.get_settings(conn)
    if settings is None:
        raise AppError(409, "the lead has not created the project yet")
    return settings


def next_for(conn, user: User) -> NextOut:
    """The user's current or next assignment with what the page needs around it (pages use it too)."""
    settings = require_settings(conn)
    aid = assignment.next_assignment(conn, user.id, settings)
    view = assignment.assignment_view(conn, aid, user.id) if aid is not None else None
    return NextOut(assignment=view, mode=settings.mode, criteria=settings.criteria, ask_strength=settings.ask_strength,
                   strengths=project.strength_names(),
                   progress=assignment.labeler_progress(conn, user.id, settings.overlap))


@router.get("/health", responses={})
def health() -> dict:
    return {"ok": True}


@router.post("/session")
def api_login(request: Request, body: SessionIn, conn: Conn) -> JSONResponse:
    """Sign in; sets the session cookie (and a sign-in ticket) and returns the CSRF token for later calls."""
    check_origin(request)  # as for the sign-in form: no page of another origin signs a browser in
    signed = sign_in(request, conn, body.name, body.password)
    if signed is None:
        raise AppError(401, "wrong name or password")
    token, user = signed
    response = JSONResponse(SessionOut(name=user.name, role=user.role, csrf_token=user.csrf_token).model_dump())
    set_session_cookie(request, response, token, user.name)
    return response


@router.delete("/session")
def api_logout(request: Request, conn: Conn, user: ApiUserCsrf) -> dict:
    end_session(conn, session_token(request))
    return {"signed_out": True}


@router.post("/next")
def api_next(conn: Conn, user: ApiUserCsrf) -> NextOut:
    """Your current item, or a new one (a POST: it may hand out an item, which changes state)."""
    return next_for(conn, user)


@router.get("/assignments/{assignment_id}")
def api_assignment(assignment_id: AssignmentId, conn: Conn, user: ApiUser) -> AssignmentOut:
    return assignment.assignment_view(conn, assignment_id, user.id)


@router.post("/assignments/{assignment_id}/skip")
def api_skip(assignment_id: AssignmentId, conn: Conn, user: ApiUserCsrf) -> dict:
    """Skip it (409 when your lease ran out and someone else took the item over, as for a submission)."""
    assignment.skip(conn, user.id, require_settings(conn), assignment_id)
    return {"skipped": assignment_id}


@router.post("/submissions", status_code=201, responses={200: {"model": SubmissionOut}})
def api_submit(body: SubmissionIn, conn: Conn, user: ApiUserCsrf) -> JSONResponse:
    """Store a ranking, or the thumbs of a thumbs project. 201: stored now; 200: this client_id was stored
    before (a retry)."""
    settings = require_settings(conn)
    status, sid = assignment.submit(conn, user.id, settings, body.model_dump(exclude_none=True))
    return JSONResponse({"status": status, "submission_id": sid}, status_code=201 if status == "stored" else 200)


@router.get("/progress")
def api_progress(conn: Conn, user: ApiUser) -> Progress:
    return assignment.labeler_progress(conn, user.id, require_settings(conn).overlap)


@router.get("/lead/stats")
def api_stats(request: Request, conn: Conn, user: ApiLead) -> dict:
    """Progress, agreement, per-labeler figures, flags and Elo (lead only)."""
    return stats.project_stats(conn, require_settings(conn), request.app.state.config.elo_rounds)
