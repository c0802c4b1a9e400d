"""Uploads and conversions: the panel's pages and the API's routes.

Members see and touch only their own files and jobs; someone else's job is a 404,
exactly like a job that does not exist, so ids cannot be probed. Uploads are
streamed into storage chunk by chunk, then registered with the conversions
service; downloads are streamed out of it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any

from jinja2.utils import htmlsafe_json_dumps
from markupsafe import Markup
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Request, Response

from framework.storage import StorageKeyNotFound
from services.conversions.exceptions import FileNotFound, JobNotFound
from services.conversions.schemas import FINISHED_STATES, JOB_STATES
from services.web.exceptions import BadRequest, NotFound, PayloadTooLarge
from services.web.http import (
    MEMBER,
    json_response,
    parse_args,
    parse_json,
    redirect,
    render,
    route,
    wants_json,
)
from services.web.schemas import (
    ConversionQuery,
    ConversionRequest,
    FileCreated,
    FormatsPayload,
    JobPage,
    JobPayload,
    UploadQuery,
)

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_ID = re.compile(r"^[0-9A-Za-z-]{1,64}$")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
FILE_NAME_MAX_LENGTH = 255


def clean_file_name(name: str | None) -> str:
    """The name a user gave, as a label only (storage keys are generated)."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip()
    if not name or name in (".", ".."):
        raise BadRequest("the file needs a name", {"name": "must not be empty"})
    return name[:FILE_NAME_MAX_LENGTH]


def content_disposition(name: str) -> str:
    ascii_name = re.sub(r"[^A-Za-z0-9._ -]", "_", name) or "download"
    from urllib.parse import quote

    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


def human_size(size: int | None) -> str:
    if size is None:
        return ""
    units = ["B", "KB", "MB", "GB", "TB"]
    value = float(size)
    for unit in units:
        if value < 1024 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def options_from_form(form: Any) -> dict[str, Any]:
    """``read.<name>`` / ``write.<name>`` form fields → nested conversion options.

    Empty fields are left out (the format's default applies); ``header`` is a
    yes/no choice; ``null_values`` is a comma-separated list.
    """
    options: dict[str, dict[str, Any]] = {"read": {}, "write": {}}
    for key, value in form.items():
        side, _, name = key.partition(".")
        if side not in options or not name or value == "":
            continue
        if name == "header":
            options[side][name] = value == "true"
        elif name == "null_values":
            options[side][name] = [part.strip() for part in value.split(",")]
        else:
            options[side][name] = value
    return {side: values for side, values in options.items() if values}


# The formats change only with a deploy of the conversions service; asking for
# them on every list page was a third of the page's RPC traffic. The page embeds
# them as JSON for its script, encoded once with them.
FORMATS_TTL = 60.0
_formats_cache: dict[str, Any] = {"value": None, "json": None, "expires": 0.0}


class ConversionRoutes:
    store: Any
    storage: Any
    conversions: Any

    def _formats(self) -> dict[str, Any]:
        now = time.monotonic()
        if _formats_cache["value"] is None or now > _formats_cache["expires"]:
            formats = self.conversions.formats()
            _formats_cache["json"] = htmlsafe_json_dumps(formats, sort_keys=True)
            _formats_cache["value"] = formats
            _formats_cache["expires"] = now + FORMATS_TTL
        return _formats_cache["value"]

    def _formats_json(self) -> Markup:
        """The formats as the page's script reads them (what ``|tojson`` gives)."""
        self._formats()
        return _formats_cache["json"]

    # -- shared rules ----------------------------------------------------------------

    def _job(self, principal: Any, job_id: str) -> dict[str, Any]:
        """The job, if the caller may see it; else ``NotFound`` (as if absent)."""
        if not _ID.match(job_id):
            raise NotFound("no such conversion")
        try:
            job = self.conversions.get_job(job_id)
        except JobNotFound:
            raise NotFound("no such conversion") from None
        if not principal.is_admin and job["owner"] != principal.user_id:
            raise NotFound("no such conversion")
        return job

    def _file(self, principal: Any, file_id: str) -> dict[str, Any]:
        if not _ID.match(file_id):
            raise NotFound("no such file")
        try:
            found = self.conversions.get_file(file_id)
        except FileNotFound:
            raise NotFound("no such file") from None
        if not principal.is_admin and found["owner"] != principal.user_id:
            raise NotFound("no such file")
        return found

    def _list_jobs(self, principal: Any, query: ConversionQuery) -> dict[str, Any]:
        owner = None if principal.is_admin else principal.user_id
        # ``after`` only when asked for: a conversions service from before
        # cursors still answers every other list.
        cursor = {"after": query.after} if query.after is not None else {}
        return self.conversions.list_jobs(
            state=query.state,
            owner=owner,
            page=query.page,
            per_page=query.per_page,
            **cursor,
        )

    def _upload(self, request: Request) -> dict[str, Any]:
        """Stream the body (raw, or a multipart ``file`` field) into storage."""
        principal = request.principal  # type: ignore[attr-defined]
        limit = self.store.settings.upload_max_bytes
        too_large = PayloadTooLarge(
            f"the file is larger than the upload limit of {human_size(limit)}"
        )
        if (request.content_length or 0) > limit:
            raise too_large
        try:
            if request.mimetype == "multipart/form-data":
                # werkzeug parses it into temporary files, not memory.
                upload = request.files.get("file")
                if upload is None:
                    raise BadRequest("send the file in a multipart field named 'file'")
                name, stream = upload.filename, upload.stream
            else:
                query = parse_args(request, UploadQuery)
                name = query.name or request.headers.get("X-File-Name")
                stream = request.stream
            name = clean_file_name(name)
            key = self.storage.new_key()
            size = 0
            with self.storage.open_write(key) as target:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    target.write(chunk)
        except RequestEntityTooLarge:
            raise too_large from None
        if size == 0:
            self.storage.delete(key)
            raise BadRequest("the file is empty")
        try:
            registered = self.conversions.register_file(
                storage_key=key,
                name=name,
                size=size,
                owner=principal.user_id,
                content_type=request.mimetype
                if request.mimetype != "multipart/form-data"
                else None,
            )
        except Exception:
            self.storage.delete(key)
            raise
        registered.pop("storage_key", None)
        log.info("file uploaded", extra={"file_id": registered["id"], "size": size})
        return registered

    def _download(self, principal: Any, job_id: str) -> Response:
        job = self._job(principal, job_id)
        output = job.get("output")
        if job["state"] != "succeeded" or not output:
            raise NotFound("this conversion has no output (yet)")
        try:
            size = self.storage.size(output["storage_key"])
            stream = self.storage.open_read(output["storage_key"])
        except StorageKeyNotFound:
            # Purged (expired) between the job's listing and this download.
            raise NotFound("this conversion's output is no longer stored") from None

        def chunks() -> Any:
            try:
                while chunk := stream.read(CHUNK):
                    yield chunk
            finally:
                stream.close()

        return Response(
            chunks(),
            mimetype="application/octet-stream",
            headers={
                "Content-Disposition": content_disposition(output["name"]),
                "Content-Length": str(size),
            },
            direct_passthrough=True,
        )

    # -- the panel ---------------------------------------------------------------------

    @route("GET", "/conversions", access=MEMBER)
    def conversions_page(self, request: Request) -> Response:
        query = parse_args(request, ConversionQuery, ignore=("file",))
        jobs = self._list_jobs(request.principal, query)  # type: ignore[attr-defined]
        uploaded = None
        if request.args.get("file"):
            uploaded = self._file(request.principal, request.args["file"])  # type: ignore[attr-defined]
        pages = max(1, math.ceil(jobs["total"] / query.per_page))
        return render(
            request,
            "conversions.html",
            jobs=jobs,
            query=query,
            pages=pages,
            states=JOB_STATES,
            finished=FINISHED_STATES,
            formats=self._formats(),
            formats_json=self._formats_json(),
            uploaded=uploaded,
            upload_limit=self.store.settings.upload_max_bytes,
            upload_limit_text=human_size(self.store.settings.upload_max_bytes),
            human_size=human_size,
        )

    @route("GET", "/conversions/poll", access=MEMBER)
    def conversions_poll(self, request: Request) -> Response:
        """The list as JSON, for the page's polling while its websocket is down."""
        query = parse_args(request, ConversionQuery)
        return json_response(self._list_jobs(request.principal, query))  # type: ignore[attr-defined]

    @route(
        "POST", "/conversions/upload", access=MEMBER, streaming=True, json_errors=True
    )
    def upload_page(self, request: Request) -> Response:
        registered = self._upload(request)
        if wants_json(request):
            return json_response(registered, status=201)
        return redirect(f"/conversions?file={registered['id']}")

    @route("POST", "/conversions", access=MEMBER)
    def start_conversion_page(self, request: Request) -> Response:
        principal = request.principal  # type: ignore[attr-defined]
        file = self._file(principal, request.form.get("file_id", ""))
        job = self.conversions.start_conversion(
            file_id=file["id"],
            target_format=request.form.get("target_format", ""),
            options=options_from_form(request.form),
            requested_by=principal.user_id,
        )
        return redirect(f"/conversions/{job['id']}")

    @route("GET", "/conversions/<job_id>", access=MEMBER)
    def conversion_page(self, request: Request, job_id: str) -> Response:
        job = self._job(request.principal, job_id)  # type: ignore[attr-defined]
        if wants_json(request):
            return json_response(job)  # the page's polling while its socket is down
        return render(
            request,
            "conversion.html",
            job=job,
            finished=FINISHED_STATES,
            human_size=human_size,
            options_text=json.dumps(job.get("options") or {}, indent=2, sort_keys=True),
        )

    @route("POST", "/conversions/<job_id>/cancel", access=MEMBER, json_errors=True)
    def cancel_page(self, request: Request, job_id: str) -> Response:
        self._job(request.principal, job_id)  # type: ignore[attr-defined]
        job = self.conversions.cancel_job(job_id)
        return (
            json_response(job)
            if wants_json(request)
            else redirect(f"/conversions/{job_id}")
        )

    @route("POST", "/conversions/<job_id>/retry", access=MEMBER, json_errors=True)
    def retry_page(self, request: Request, job_id: str) -> Response:
        self._job(request.principal, job_id)  # type: ignore[attr-defined]
        job = self.conversions.retry_job(job_id)
        return (
            json_response(job)
            if wants_json(request)
            else redirect(f"/conversions/{job_id}")
        )

    @route("POST", "/conversions/<job_id>/delete", access=MEMBER, json_errors=True)
    def delete_page(self, request: Request, job_id: str) -> Response:
        self._job(request.principal, job_id)  # type: ignore[attr-defined]
        self.conversions.delete_job(job_id)
        return (
            json_response({"deleted": job_id})
            if wants_json(request)
            else redirect("/conversions")
        )

    @route("GET", "/conversions/<job_id>/download", access=MEMBER)
    def download_page(self, request: Request, job_id: str) -> Response:
        return self._download(request.principal, job_id)  # type: ignore[attr-defined]

    # -- the API -----------------------------------------------------------------------

    @route(
        "GET",
        "/api/v1/formats",
        summary="The formats, their options, and the conversions between them",
        response=FormatsPayload,
        tag="conversions",
    )
    def api_formats(self, request: Request) -> Response:
        return json_response(self.conversions.formats())

    @route(
        "POST",
        "/api/v1/files",
        summary="Upload a file (the raw body with ?name=, or multipart field 'file')",
        query=UploadQuery,
        raw_body="application/octet-stream",
        response=FileCreated,
        status=201,
        streaming=True,
        tag="conversions",
    )
    def api_upload(self, request: Request) -> Response:
        return json_response(self._upload(request), status=201)

    @route(
        "POST",
        "/api/v1/conversions",
        summary="Start converting an uploaded file",
        body=ConversionRequest,
        response=JobPayload,
        status=202,
        tag="conversions",
    )
    def api_start_conversion(self, request: Request) -> Response:
        principal = request.principal  # type: ignore[attr-defined]
        data = parse_json(request, ConversionRequest)
        file = self._file(principal, data.file_id)
        job = self.conversions.start_conversion(
            file_id=file["id"],
            target_format=data.target_format,
            options=data.options,
            requested_by=principal.user_id,
        )
        return json_response(
            job, status=202, headers={"Location": f"/api/v1/conversions/{job['id']}"}
        )

    @route(
        "GET",
        "/api/v1/conversions",
        summary="Conversions, newest first (members: their own)",
        query=ConversionQuery,
        response=JobPage,
        tag="conversions",
    )
    def api_list_conversions(self, request: Request) -> Response:
        query = parse_args(request, ConversionQuery)
        return json_response(self._list_jobs(request.principal, query))  # type: ignore[attr-defined]

    @route(
        "GET",
        "/api/v1/conversions/<job_id>",
        summary="One conversion",
        response=JobPayload,
        tag="conversions",
    )
    def api_get_conversion(self, request: Request, job_id: str) -> Response:
        return json_response(self._job(request.principal, job_id))  # type: ignore[attr-defined]

    @route(
        "POST",
        "/api/v1/conversions/<job_id>/cancel",
        summary="Cancel a queued or running conversion",
        response=JobPayload,
        tag="conversions",
    )
    def api_cancel_conversion(self, request: Request, job_id: str) -> Response:
        self._job(request.principal, job_id)  # type: ignore[attr-defined]
        return json_response(self.conversions.cancel_job(job_id))

    @route(
        "POST",
        "/api/v1/conversions/<job_id>/retry",
        summary="Run a failed or cancelled conversion again",
        response=JobPayload,
        tag="conversions",
    )
    def api_retry_conversion(self, request: Request, job_id: str) -> Response:
        self._job(request.principal, job_id)  # type: ignore[attr-defined]
        return json_response(self.conversions.retry_job(job_id))

    @route(
        "DELETE",
        "/api/v1/conversions/<job_id>",
        summary="Delete a conversion and its output",
        status=204,
        tag="conversions",
    )
    def api_delete_conversion(self, request: Request, job_id: str) -> Response:
        self._job(request.principal, job_id)  # type: ignore[attr-defined]
        self.conversions.delete_job(job_id)
        return Response(status=204)

    @route(
        "GET",
        "/api/v1/conversions/<job_id>/output",
        summary="Download a conversion's output",
        raw_body="application/octet-stream",
        tag="conversions",
    )
    def api_download(self, request: Request, job_id: str) -> Response:
        return self._download(request.principal, job_id)  # type: ignore[attr-defined]
