"""Schedules administration (admins only): the panel's pages and the API's routes.

The scheduler validates schedules itself (``InvalidSchedule`` with per-field
errors); the pages show its errors next to the fields, and the form previews the
next fire times of the cron expression as it is typed (``scheduler.preview``).
"""

from __future__ import annotations

import json
from typing import Any

from werkzeug.wrappers import Request, Response

from services.scheduler.exceptions import InvalidSchedule
from services.web.exceptions import BadRequest
from services.web.http import (
    ADMIN,
    json_response,
    parse_args,
    redirect,
    render,
    route,
    wants_json,
)
from services.web.schemas import (
    Run,
    RunPage,
    RunQuery,
    Schedule,
    ScheduleChanges,
    ScheduleDetail,
    SchedulePage,
    ScheduleQuery,
    ScheduleSpec,
)

MISSED_RUN_POLICIES = ("skip", "run_once", "run_all")
OVERLAP_POLICIES = ("skip", "allow", "queue_one")
INTEGER_FIELDS = (
    "catchup_window_seconds",
    "jitter_seconds",
    "timeout_seconds",
    "history_limit",
)


def schedule_from_form(form: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The schedule a form describes, and the errors of fields that are not even
    the right type (the scheduler checks the rest)."""
    errors: dict[str, str] = {}
    spec: dict[str, Any] = {
        "name": form.get("name", ""),
        "cron": form.get("cron", ""),
        "timezone": form.get("timezone", "") or "UTC",
        "enabled": form.get("enabled") == "on",
        "missed_run_policy": form.get("missed_run_policy", "skip"),
        "overlap_policy": form.get("overlap_policy", "skip"),
    }
    for field in INTEGER_FIELDS:
        value = form.get(field, "").strip()
        if value:
            try:
                spec[field] = int(value)
            except ValueError:
                errors[field] = "must be a whole number"
    kind = form.get("target_kind", "rpc")
    field = "target.kwargs" if kind == "rpc" else "target.payload"
    try:
        data = json.loads(form.get(field, "") or "{}")
        if not isinstance(data, dict):
            raise ValueError
    except ValueError:
        errors[field] = "must be a JSON object"
        data = {}
    if kind == "rpc":
        spec["target"] = {
            "kind": "rpc",
            "service": form.get("target.service", ""),
            "method": form.get("target.method", ""),
            "kwargs": data,
        }
    else:
        spec["target"] = {
            "kind": "event",
            "event_type": form.get("target.event_type", ""),
            "payload": data,
        }
    return spec, errors


def form_from_schedule(schedule: dict[str, Any]) -> dict[str, Any]:
    form = {k: v for k, v in schedule.items() if k != "target"}
    target = schedule["target"]
    form["target_kind"] = target["kind"]
    for key, value in target.items():
        form[f"target.{key}"] = json.dumps(value) if isinstance(value, dict) else value
    return form


class ScheduleRoutes:
    scheduler: Any

    def _form(
        self,
        request: Request,
        schedule: Any,
        form: Any,
        errors: dict[str, str],
        status: int = 200,
    ) -> Response:
        return render(
            request,
            "schedule_form.html",
            status=status,
            schedule=schedule,
            form=form,
            errors=errors,
            missed_run_policies=MISSED_RUN_POLICIES,
            overlap_policies=OVERLAP_POLICIES,
        )

    # -- the panel ---------------------------------------------------------------------

    @route("GET", "/schedules", access=ADMIN)
    def schedules_page(self, request: Request) -> Response:
        query = parse_args(request, ScheduleQuery)
        page = self.scheduler.list_schedules(page=query.page, per_page=query.per_page)
        # The list does not carry next and last runs; the details do.
        details = [self.scheduler.get_schedule(item["id"]) for item in page["items"]]
        return render(
            request, "schedules.html", page=page, schedules=details, query=query
        )

    @route("GET", "/schedules/new", access=ADMIN)
    def new_schedule_page(self, request: Request) -> Response:
        form = {
            "timezone": "UTC",
            "enabled": True,
            "target_kind": "rpc",
            "target.kwargs": "{}",
            "target.payload": "{}",
            "missed_run_policy": "skip",
            "overlap_policy": "skip",
        }
        return self._form(request, None, form, {})

    @route("GET", "/schedules/preview", access=ADMIN, json_errors=True)
    def preview_page(self, request: Request) -> Response:
        """The next fire times of a cron expression, for the form (JSON)."""
        cron = request.args.get("cron", "")[:200]
        timezone = request.args.get("timezone", "UTC")[:100] or "UTC"
        return json_response({"fire_times": self.scheduler.preview(cron, timezone)})

    @route("POST", "/schedules", access=ADMIN)
    def create_schedule_page(self, request: Request) -> Response:
        spec, errors = schedule_from_form(request.form)
        if errors:
            return self._form(request, None, request.form, errors, status=422)
        try:
            schedule = self.scheduler.create_schedule(spec)
        except InvalidSchedule as exc:
            return self._form(request, None, request.form, exc.errors, status=422)
        return redirect(f"/schedules/{schedule['id']}")

    @route("GET", "/schedules/<int:schedule_id>", access=ADMIN)
    def schedule_page(self, request: Request, schedule_id: int) -> Response:
        schedule = self.scheduler.get_schedule(schedule_id)
        if wants_json(request):
            return json_response(schedule)  # the page catching up after a reconnect
        return self._form(request, schedule, form_from_schedule(schedule), {})

    @route("POST", "/schedules/<int:schedule_id>", access=ADMIN)
    def update_schedule_page(self, request: Request, schedule_id: int) -> Response:
        spec, errors = schedule_from_form(request.form)
        if not errors:
            try:
                self.scheduler.update_schedule(schedule_id, spec)
            except InvalidSchedule as exc:
                errors = exc.errors
        if errors:
            schedule = self.scheduler.get_schedule(schedule_id)
            return self._form(request, schedule, request.form, errors, status=422)
        return redirect(f"/schedules/{schedule_id}")

    @route(
        "POST",
        "/schedules/<int:schedule_id>/<any(pause,resume,run):action>",
        access=ADMIN,
    )
    def schedule_action_page(
        self, request: Request, schedule_id: int, action: str
    ) -> Response:
        method = {"pause": "pause", "resume": "resume", "run": "run_now"}[action]
        getattr(self.scheduler, method)(schedule_id)
        return redirect(f"/schedules/{schedule_id}")

    @route("GET", "/schedules/<int:schedule_id>/delete", access=ADMIN)
    def confirm_delete_schedule_page(
        self, request: Request, schedule_id: int
    ) -> Response:
        schedule = self.scheduler.get_schedule(schedule_id)
        return render(
            request,
            "confirm.html",
            title=f"Delete schedule {schedule['name']}?",
            message="Its run history is deleted with it.",
            action=f"/schedules/{schedule_id}/delete",
            back=f"/schedules/{schedule_id}",
            button="Delete schedule",
        )

    @route("POST", "/schedules/<int:schedule_id>/delete", access=ADMIN)
    def delete_schedule_page(self, request: Request, schedule_id: int) -> Response:
        self.scheduler.delete_schedule(schedule_id)
        return redirect("/schedules")

    # -- the API -----------------------------------------------------------------------

    @route(
        "GET",
        "/api/v1/schedules",
        access=ADMIN,
        summary="Schedules",
        query=ScheduleQuery,
        response=SchedulePage,
        tag="schedules",
    )
    def api_list_schedules(self, request: Request) -> Response:
        query = parse_args(request, ScheduleQuery)
        return json_response(
            self.scheduler.list_schedules(page=query.page, per_page=query.per_page)
        )

    @route(
        "POST",
        "/api/v1/schedules",
        access=ADMIN,
        summary="Create a schedule",
        body=ScheduleSpec,
        response=Schedule,
        status=201,
        tag="schedules",
    )
    def api_create_schedule(self, request: Request) -> Response:
        data = _json_object(request)
        schedule = self.scheduler.create_schedule(data)
        return json_response(
            schedule,
            status=201,
            headers={"Location": f"/api/v1/schedules/{schedule['id']}"},
        )

    @route(
        "GET",
        "/api/v1/schedules/<int:schedule_id>",
        access=ADMIN,
        summary="One schedule, its next fire times and last runs",
        response=ScheduleDetail,
        tag="schedules",
    )
    def api_get_schedule(self, request: Request, schedule_id: int) -> Response:
        return json_response(self.scheduler.get_schedule(schedule_id))

    @route(
        "PATCH",
        "/api/v1/schedules/<int:schedule_id>",
        access=ADMIN,
        summary="Change a schedule",
        body=ScheduleChanges,
        response=Schedule,
        tag="schedules",
    )
    def api_update_schedule(self, request: Request, schedule_id: int) -> Response:
        changes = _json_object(request)
        return json_response(self.scheduler.update_schedule(schedule_id, changes))

    @route(
        "DELETE",
        "/api/v1/schedules/<int:schedule_id>",
        access=ADMIN,
        summary="Delete a schedule",
        status=204,
        tag="schedules",
    )
    def api_delete_schedule(self, request: Request, schedule_id: int) -> Response:
        self.scheduler.delete_schedule(schedule_id)
        return Response(status=204)

    @route(
        "POST",
        "/api/v1/schedules/<int:schedule_id>/pause",
        access=ADMIN,
        summary="Pause a schedule",
        response=Schedule,
        tag="schedules",
    )
    def api_pause_schedule(self, request: Request, schedule_id: int) -> Response:
        return json_response(self.scheduler.pause(schedule_id))

    @route(
        "POST",
        "/api/v1/schedules/<int:schedule_id>/resume",
        access=ADMIN,
        summary="Resume a paused schedule",
        response=Schedule,
        tag="schedules",
    )
    def api_resume_schedule(self, request: Request, schedule_id: int) -> Response:
        return json_response(self.scheduler.resume(schedule_id))

    @route(
        "POST",
        "/api/v1/schedules/<int:schedule_id>/run",
        access=ADMIN,
        summary="Run a schedule now",
        response=Run,
        status=202,
        tag="schedules",
    )
    def api_run_schedule(self, request: Request, schedule_id: int) -> Response:
        return json_response(self.scheduler.run_now(schedule_id), status=202)

    @route(
        "GET",
        "/api/v1/schedules/<int:schedule_id>/runs",
        access=ADMIN,
        summary="A schedule's runs, newest first",
        query=RunQuery,
        response=RunPage,
        tag="schedules",
    )
    def api_list_runs(self, request: Request, schedule_id: int) -> Response:
        query = parse_args(request, RunQuery)
        return json_response(
            self.scheduler.list_runs(
                schedule_id, page=query.page, per_page=query.per_page
            )
        )


def _json_object(request: Request) -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise BadRequest("send a JSON body (Content-Type: application/json)")
    try:
        data = json.loads(request.get_data(cache=True) or b"null")
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data
