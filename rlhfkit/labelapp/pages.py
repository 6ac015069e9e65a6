"""The HTML pages: sign-in and invitations, guidelines and labeling for labelers, the lead's page.

Rendered by Jinja2 with autoescaping: prompts, completions, comments and names are always text, never
markup. Every form posts a CSRF token (deps.check_form_csrf / deps.check_anon_csrf).
"""

import functools
import secrets
import shutil
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from rlhfkit.core.errors import DataError, RlhfkitError
from rlhfkit.labelapp import assignment, db, project, security, stats
from rlhfkit.labelapp.api import MAX_ID, next_for, require_settings
from rlhfkit.labelapp.assignment import AppError
from rlhfkit.labelapp.deps import (
    Conn,
    CurrentUser,
    PageLead,
    PageUser,
    check_anon_csrf,
    check_form_csrf,
    delete_cookie,
    session_token,
    set_session_cookie,
    set_ticket_cookie,
    sign_in,
)
from rlhfkit.labelapp.export import EXPORT_FILES, export_project
from rlhfkit.labelapp.security import User

router = APIRouter(include_in_schema=False)
MAX_MESSAGE = 400  # characters of an error message: a refusal never echoes a large input back


def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status)


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(request: Request, status: int, message: str, headers=None):
    """A refusal: JSON {"error": message} under /api, the error page elsewhere."""
    message = clip(message)
    if request.scope["path"].startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    response = page(request, "error.html", status=status, message=message, user=None)
    response.headers.update(headers or {})
    return response


def anon_form(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    """A form for someone not signed in, with a fresh double-submit CSRF token."""
    token, config = secrets.token_urlsafe(16), request.app.state.config
    response = page(request, name, status=status, login_csrf=token, user=None, **context)
    response.set_cookie(config.cookies.login_csrf, token, httponly=True, samesite="strict",
                        secure=config.cookie_secure, path="/")
    return response


# -- signing in -----------------------------------------------------------------------------------------


@router.get("/")
def home(user: CurrentUser):
    if user is None:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse("/lead" if user.is_lead else "/guidelines", status_code=303)


@router.get("/login")
def login_page(request: Request):
    return anon_form(request, "login.html", error=None)


@router.post("/login")
def login(request: Request, conn: Conn, name: Annotated[str, Form(max_length=64)],
          password: Annotated[str, Form(max_length=256)], csrf_token: Annotated[str, Form()] = ""):
    check_anon_csrf(request, csrf_token)
    signed = sign_in(request, conn, name, password)
    if signed is None:
        return anon_form(request, "login.html", status=401, error="Wrong name or password.")
    token, user = signed
    # Labelers land on the guidelines: they read them before their first item.
    response = RedirectResponse("/lead" if user.is_lead else "/guidelines", status_code=303)
    set_session_cookie(request, response, token, user.name)
    return response


@router.post("/logout")
def logout(request: Request, conn: Conn, user: PageUser, csrf_token: Annotated[str, Form()] = ""):
    check_form_csrf(user, csrf_token)
    security.end_session(conn, session_token(request))
    response = RedirectResponse("/login", status_code=303)
    # The sign-in ticket stays: it only lets this browser's next sign-ins past its address's throttle.
    delete_cookie(request, response, request.app.state.config.cookies.session)
    return response


@router.get("/invite/{token}")
def invite_page(request: Request, token: str):
    return anon_form(request, "invite.html", token=token, error=None)


@router.post("/invite/{token}")
def accept_invite(request: Request, token: str, conn: Conn, password: Annotated[str, Form(max_length=256)],
                  password2: Annotated[str, Form(max_length=256)], csrf_token: Annotated[str, Form()] = ""):
    check_anon_csrf(request, csrf_token)
    if password != password2:
        return anon_form(request, "invite.html", status=400, token=token, error="Type the same password twice.")
    problem = security.password_problem(password)
    if problem is not None:
        return anon_form(request, "invite.html", status=400, token=token,
                         error=f"Choose another password: {problem}.")
    with db.transaction(conn):
        name = project.accept_invitation(conn, token, password, request.app.state.config.scrypt_n)
    if name is None:
        raise AppError(400, "This invitation link is unknown, used or expired. Ask your lead for a new one.")
    response = anon_form(request, "login.html", error=None, notice=f"Password set for {name}. Sign in.")
    # The invitation proved who this is as well as a password would: this browser gets a sign-in ticket,
    # so nobody's guesses from a shared address can keep a newcomer from their first sign-in.
    set_ticket_cookie(request, response, name)
    return response


# -- labeling -------------------------------------------------------------------------------------------


@router.get("/guidelines")
def guidelines(request: Request, conn: Conn, user: PageUser):
    return page(request, "guidelines.html", user=user, settings=project.get_settings(conn))


@router.get("/label")
def label(request: Request, conn: Conn, user: PageUser):
    settings = project.get_settings(conn)
    if settings is None:
        return page(request, "guidelines.html", user=user, settings=None)
    nxt = next_for(conn, user)
    if nxt.assignment is None:
        return page(request, "done.html", user=user, progress=nxt.progress, settings=settings)
    if settings.mode == "thumbs":
        # A plain form (works without JavaScript): the client id is made here, once per page, so a form
        # posted twice (a reload after a lost answer) is stored once.
        return page(request, "thumbs.html", user=user, settings=settings, a=nxt.assignment, letters="ABCDEFGHI",
                    progress=nxt.progress, client_id=secrets.token_urlsafe(18))
    return page(request, "label.html", user=user, settings=settings, a=nxt.assignment, letters="ABCDEFGHI",
                progress=nxt.progress, strengths=nxt.strengths)


async def form_fields(request: Request) -> list[tuple[str, str]]:
    """Every text field of a posted form, in order, repeats included (a file where text belongs is left out,
    so it reads as missing)."""
    return [(k, v) for k, v in (await request.form()).multi_items() if isinstance(v, str)]


THUMB_VALUES = {"up": True, "down": False}


@router.post("/label/thumbs")
def label_thumbs(conn: Conn, user: PageUser, form: Annotated[list, Depends(form_fields)]):
    """The thumbs page's form: `thumb.CRITERION.POSITION` = up | down for every reply, with the assignment,
    the page's client id, and optional `flag.POSITION` and `comment`. Stored as POST /api/submissions stores
    it (same checks, same idempotence); then the next item."""
    fields: dict[str, str] = {}
    for key, value in form:
        fields.setdefault(key, value)
    check_form_csrf(user, fields.get("csrf_token"))
    settings = require_settings(conn)
    if settings.mode != "thumbs":
        raise AppError(409, "This project collects rankings, not thumbs: reload the labeling page.")
    aid = fields.get("assignment_id", "")
    if not (aid.isascii() and aid.isdigit() and 1 <= int(aid) <= MAX_ID):
        raise AppError(422, "The form has no valid assignment: reload the labeling page.")
    thumbs: dict[str, list[dict]] = {}
    flags = []
    for key, value in form:  # repeats included: two different thumbs for one reply are refused, not merged
        kind, _, rest = key.partition(".")
        if kind == "thumb":
            criterion, _, position = rest.rpartition(".")
            if not (position.isascii() and position.isdigit()) or value not in THUMB_VALUES:
                raise AppError(422, f"{clip(key, 60)}: choose thumb up or thumb down for each reply")
            thumbs.setdefault(criterion, []).append({"position": int(position), "label": THUMB_VALUES[value]})
        elif kind == "flag" and value:
            if not (rest.isascii() and rest.isdigit()):
                raise AppError(422, f"{clip(key, 60)}: not a reply of this item")
            flags.append({"position": int(rest), "reason": value})
    if not thumbs:
        raise AppError(422, "Give every reply a thumb up or down, then submit.")
    assignment.submit(conn, user.id, settings, {
        "client_id": fields.get("client_id"), "assignment_id": int(aid), "thumbs": thumbs, "flags": flags,
        "comment": fields.get("comment", "")})
    return RedirectResponse("/label", status_code=303)


@router.post("/label/skip")
def label_skip(conn: Conn, user: PageUser, assignment_id: Annotated[int, Form(ge=1, le=MAX_ID)],
               csrf_token: Annotated[str, Form()] = ""):
    """Skip from a form (the thumbs page without JavaScript); as POST /api/assignments/ID/skip."""
    check_form_csrf(user, csrf_token)
    assignment.skip(conn, user.id, require_settings(conn), assignment_id)
    return RedirectResponse("/label", status_code=303)


# -- the lead -------------------------------------------------------------------------------------------


def latest_export(project_dir: Path) -> Path | None:
    done = sorted((project_dir / "exports").glob("*/export.json"))
    return done[-1].parent if done else None


def lead_page(request: Request, conn, user: User, status: int = 200, **extra):
    config = request.app.state.config
    settings = project.get_settings(conn)
    figures = stats.project_stats(conn, settings, config.elo_rounds) if settings else None
    return page(request, "lead.html", status=status, user=user, settings=settings, stats=figures,
                last_export=latest_export(config.project_dir), **extra)


@router.get("/lead")
def lead(request: Request, conn: Conn, user: PageLead):
    return lead_page(request, conn, user)


@router.post("/lead/create")
async def lead_create(request: Request, user: PageLead, csrf_token: Annotated[str, Form()] = "",
                      name: Annotated[str, Form()] = "labeling", criteria: Annotated[str, Form()] = "overall",
                      k: Annotated[int, Form()] = 4, overlap: Annotated[int, Form()] = 1,
                      ask_strength: Annotated[str, Form()] = "", guidelines: Annotated[str, Form()] = "",
                      mode: Annotated[str, Form()] = "ranking",
                      policy_dir: Annotated[str, Form()] = "",
                      completions: Annotated[UploadFile | None, File()] = None,
                      prompts: Annotated[UploadFile | None, File()] = None):
    check_form_csrf(user, csrf_token)
    project_dir = request.app.state.config.project_dir
    if await run_in_threadpool(project.project_exists, project_dir):
        raise AppError(409, "This directory already holds a labeling project; nothing was changed.")
    settings = project.ProjectSettings(
        name=name.strip() or "labeling", criteria=[c.strip() for c in criteria.split(",") if c.strip()],
        k=k, overlap=overlap, ask_strength=bool(ask_strength), guidelines=guidelines, mode=mode).validate()
    # Uploads are kept (the project records where its items came from), but only once the project is
    # created: until then they are temporary files, so a refused create leaves an earlier upload alone.
    uploads = project_dir / "uploads"
    pending: dict[str, Path] = {}  # final name -> temporary file

    async def save(upload: UploadFile | None, filename: str) -> Path | None:
        if upload is None or not upload.filename:
            return None
        uploads.mkdir(parents=True, exist_ok=True)
        pending[filename] = uploads / f".upload-{secrets.token_hex(8)}{Path(filename).suffix}"
        await run_in_threadpool(copy_upload, upload, pending[filename])
        return pending[filename]

    try:
        completions_path = await save(completions, "completions.jsonl")
        suffix = ".jsonl" if prompts is not None and (prompts.filename or "").endswith(".jsonl") else ".txt"
        prompts_path = await save(prompts, "prompts" + suffix)
        if completions_path is not None:
            loader = functools.partial(project.load_completions, mode=settings.mode)
            items = await run_in_threadpool(load_upload, loader, completions_path, "completions.jsonl")
            source = "uploaded completions"
        elif policy_dir.strip() and prompts_path is not None:
            prompt_list = await run_in_threadpool(load_upload, project.load_prompts, prompts_path, "prompts" + suffix)
            # sampling runs a model: off the event loop
            items = await run_in_threadpool(project.sample_items, policy_dir.strip(), prompt_list, settings.k)
            source = f"sampled from {policy_dir.strip()}"
        else:
            raise AppError(400, "Upload a completions JSONL file, or give a policy directory and a prompts file.")
        await run_in_threadpool(project.create_project, project_dir, settings, items, source)
        for filename, path in pending.items():
            path.replace(uploads / filename)
    finally:
        for path in pending.values():
            path.unlink(missing_ok=True)
    return RedirectResponse("/lead", status_code=303)


def copy_upload(upload: UploadFile, path: Path) -> None:
    """Copy in chunks: the upload (spooled to disk by Starlette) never sits in memory whole."""
    upload.file.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out, 2**20)


def load_upload(loader, path: Path, shown_as: str):
    """Load an uploaded file; its errors name the upload (completions.jsonl:3), not the temporary file."""
    try:
        return loader(path)
    except RlhfkitError as e:
        raise DataError(str(e).replace(str(path), shown_as)) from None


async def form_role(request: Request):
    """The add-person form's `role` exactly as sent ("labeler" when left out). A Form() parameter would
    take an empty value for a missing one and quietly make `role=` a labeler."""
    return (await request.form()).get("role", "labeler")


@router.post("/lead/people")
def lead_add_person(request: Request, conn: Conn, user: PageLead, name: Annotated[str, Form(max_length=64)],
                    role: Annotated[object, Depends(form_role)], csrf_token: Annotated[str, Form()] = ""):
    check_form_csrf(user, csrf_token)
    if role not in ("labeler", "lead"):  # the roles of users.role (schema.sql)
        shown = repr(clip(role, 40)) if isinstance(role, str) else "(a file)"
        raise AppError(400, f"The role {shown} is not one this app knows: choose 'labeler' or 'lead'.")
    config = request.app.state.config
    with db.transaction(conn):
        # "lead" promotes; otherwise a new person is a labeler and an existing one keeps their role, so a
        # new link (a password reset) for a lead never demotes them.
        token = project.add_person(conn, name.strip(), "lead" if role == "lead" else None, config.invite_seconds)
    link = config.base_url.rstrip("/") + f"/invite/{token}"  # never the request's Host header
    return lead_page(request, conn, user, invite={"name": name.strip(), "link": link})


@router.post("/lead/guidelines")
def lead_guidelines(conn: Conn, user: PageLead, guidelines: Annotated[str, Form(max_length=50_000)] = "",
                    csrf_token: Annotated[str, Form()] = ""):
    check_form_csrf(user, csrf_token)
    with db.transaction(conn):
        project.set_guidelines(conn, guidelines)
    return RedirectResponse("/lead", status_code=303)


@router.post("/lead/export")
def lead_export(request: Request, conn: Conn, user: PageLead, min_agreement: Annotated[str, Form()] = "",
                csrf_token: Annotated[str, Form()] = ""):
    check_form_csrf(user, csrf_token)
    try:
        threshold = float(min_agreement) if min_agreement.strip() else None
    except ValueError:
        raise AppError(400, f"Minimum agreement {min_agreement!r} is not a number between 0 and 1.") from None
    exports, stamp = request.app.state.config.project_dir / "exports", time.strftime("%Y%m%d-%H%M%S")
    out, n = exports / stamp, 1
    while out.exists():  # two exports in one second: a new directory, not the first one rewritten
        n += 1
        out = exports / f"{stamp}-{n}"
    summary = export_project(request.app.state.config.project_dir, out, min_agreement=threshold)
    return lead_page(request, conn, user, exported={"path": str(out), **summary})


@router.get("/lead/exports/latest/{filename}")
def lead_download(request: Request, filename: str, user: PageLead):
    if filename not in EXPORT_FILES:  # a fixed list: no path from the URL ever reaches the filesystem
        raise AppError(404, "no such export file")
    latest = latest_export(request.app.state.config.project_dir)
    if latest is None:
        raise AppError(404, "nothing exported yet: press Export first")
    if not (latest / filename).is_file():  # a thumbs export has no comparisons, a ranking export no thumbs
        raise AppError(404, f"the latest export has no {filename}")
    return FileResponse(latest / filename, filename=filename)
