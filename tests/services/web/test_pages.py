"""The panel's pages and forms, driven over HTTP as a browser would (cookies, CSRF
tokens from the pages), and its live pushes over the websocket; plus the small
pure helpers behind them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from werkzeug.datastructures import MultiDict

from framework.standalone.rpc import ClusterRpcProxy
from services.web.http import safe_next
from services.web.openapi import openapi_path
from services.web.routes.conversions import clean_file_name, options_from_form
from services.web.routes.schedules import schedule_from_form

from . import fakes
from .conftest import App
from .test_security import ws_call, ws_connect

CSV = b"a,b\n1,2\n"


def upload_page(
    panel: Any, name: str = "data.csv", body: bytes = CSV, csrf: str | None = None
) -> Any:
    return panel.post(
        f"/conversions/upload?name={name}",
        data=body,
        headers={
            "X-CSRF-Token": panel.csrf if csrf is None else csrf,
            "Accept": "application/json",
            "Content-Type": "application/octet-stream",
        },
    )


# -- conversions ----------------------------------------------------------------------


def test_the_upload_script_path_streams_and_registers_the_file(app: App) -> None:
    panel = app.admin()
    response = upload_page(panel)
    assert response.status_code == 201
    assert response.json()["format"] == "csv"
    refused = upload_page(panel, csrf="")
    assert refused.status_code == 403
    assert refused.headers["Content-Type"] == "application/problem+json"
    too_big = upload_page(panel, body=b"x" * (1024 * 1024 + 10))
    assert too_big.status_code == 413
    assert "larger than the upload limit of 1.0 MB" in too_big.json()["detail"]


def test_a_conversion_started_from_the_form_carries_its_options(app: App) -> None:
    panel = app.admin()
    file = upload_page(panel).json()
    page = panel.get(f"/conversions?file={file['id']}")
    assert 'id="start-form" method="post" action="/conversions" >' in page.text
    response = panel.submit(
        "/conversions",
        {
            "file_id": file["id"],
            "target_format": "parquet",
            "read.delimiter": ";",
            "read.header": "false",
            "write.compression": "snappy",
            "read.encoding": "",
        },
    )
    assert response.status_code == 303
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    assert fakes.JOBS[job_id]["options"] == {
        "read": {"delimiter": ";", "header": False},
        "write": {"compression": "snappy"},
    }
    detail = panel.get(f"/conversions/{job_id}")
    assert "Conversion of data.csv" in detail.text and "snappy" in detail.text
    assert (
        panel.get(
            f"/conversions/{job_id}", headers={"Accept": "application/json"}
        ).json()["id"]
        == job_id
    )
    polled = panel.get("/conversions/poll").json()
    assert [job["id"] for job in polled["items"]] == [job_id]


def test_cancel_retry_and_delete_from_the_pages(app: App) -> None:
    panel = app.admin()
    file = upload_page(panel).json()
    job_id = (
        panel.submit("/conversions", {"file_id": file["id"], "target_format": "json"})
        .headers["Location"]
        .rsplit("/", 1)[-1]
    )
    assert panel.submit(f"/conversions/{job_id}/cancel").status_code == 303
    assert fakes.JOBS[job_id]["state"] == "cancelled"
    conflict = panel.submit(f"/conversions/{job_id}/cancel")
    assert conflict.status_code == 409
    assert panel.submit(f"/conversions/{job_id}/retry").status_code == 303
    assert fakes.JOBS[job_id]["state"] == "queued"
    assert (
        panel.submit(f"/conversions/{job_id}/delete").headers["Location"]
        == "/conversions"
    )
    assert job_id not in fakes.JOBS
    assert panel.get(f"/conversions/{job_id}").status_code == 404


def test_a_member_gets_404_for_another_members_job_page_and_actions(app: App) -> None:
    admin = app.admin()
    file = upload_page(admin).json()
    job_id = (
        admin.submit("/conversions", {"file_id": file["id"], "target_format": "json"})
        .headers["Location"]
        .rsplit("/", 1)[-1]
    )
    app.create_member()
    member = app.session()
    member.login("member@example.com", "member password")
    assert member.get(f"/conversions/{job_id}").status_code == 404
    assert member.get(f"/conversions/{job_id}/download").status_code == 404
    assert member.submit(f"/conversions/{job_id}/cancel").status_code == 404
    assert member.get(f"/conversions?file={file['id']}").status_code == 404
    assert fakes.JOBS[job_id]["state"] == "queued"
    assert "No conversions." in member.get("/conversions").text


# -- users ----------------------------------------------------------------------------


def test_users_are_created_edited_deactivated_and_deleted_in_the_pages(
    app: App,
) -> None:
    panel = app.admin()
    bad = panel.submit(
        "/users",
        {"email": "nope", "password": "short", "display_name": "", "role": "member"},
    )
    assert bad.status_code == 422
    assert 'aria-invalid="true"' in bad.text and "not an email address" in bad.text
    created = panel.submit(
        "/users",
        {
            "email": "ann@example.com",
            "password": "ann password",
            "display_name": "Ann",
            "role": "member",
        },
    )
    assert created.status_code == 303
    user_path = created.headers["Location"]
    taken = panel.submit(
        "/users",
        {
            "email": "ann@example.com",
            "password": "ann password",
            "display_name": "Ann",
            "role": "member",
        },
    )
    assert taken.status_code == 409 and "is already registered" in taken.text
    assert (
        panel.submit(user_path, {"display_name": "Annie", "role": "admin"}).status_code
        == 303
    )
    assert "Annie" in panel.get("/users?text=ann").text
    assert panel.submit(user_path + "/deactivate").status_code == 303
    assert "deactivated" in panel.get(user_path).text
    assert panel.submit(user_path + "/activate").status_code == 303
    assert "Delete Annie?" in panel.get(user_path + "/delete").text
    assert panel.submit(user_path + "/delete").headers["Location"] == "/users"
    assert panel.get(user_path).status_code == 404


def test_an_admin_resets_a_password_from_the_users_page(app: App) -> None:
    user = app.create_member()
    member = app.session()
    assert member.login("member@example.com", "member password").status_code == 303
    panel = app.admin()
    user_path = f"/users/{user['id']}"
    assert f'href="{user_path}/password"' in panel.get(user_path).text
    form = panel.get(user_path + "/password").text
    assert '<label for="password">New password</label>' in form
    assert '<label for="confirmation">Repeat the new password</label>' in form
    assert 'name="csrf_token"' in form

    mismatch = panel.submit(
        user_path + "/password", {"password": "a fresh one", "confirmation": "another"}
    )
    assert mismatch.status_code == 422 and 'aria-invalid="true"' in mismatch.text
    assert "does not match" in mismatch.text
    weak = panel.submit(
        user_path + "/password", {"password": "short", "confirmation": "short"}
    )
    assert weak.status_code == 422 and "at least 8 characters" in weak.text
    assert member.get("/conversions", allow_redirects=False).status_code == 200

    done = panel.submit(
        user_path + "/password",
        {"password": "a fresh one", "confirmation": "a fresh one"},
    )
    assert done.status_code == 303
    assert "Password reset." in panel.get(done.headers["Location"]).text
    assert member.get("/conversions", allow_redirects=False).status_code == 303
    assert app.session().login("member@example.com", "a fresh one").status_code == 303


# -- schedules ------------------------------------------------------------------------

SCHEDULE_FORM = {
    "name": "export",
    "cron": "0 2 * * *",
    "timezone": "UTC",
    "target_kind": "rpc",
    "target.service": "conversions",
    "target.method": "export_users",
    "target.kwargs": '{"target_format": "csv"}',
    "enabled": "on",
    "missed_run_policy": "run_once",
    "overlap_policy": "skip",
    "timeout_seconds": "120",
}


def test_schedules_are_created_previewed_and_run_from_the_pages(app: App) -> None:
    panel = app.admin()
    bad = panel.submit(
        "/schedules", {**SCHEDULE_FORM, "cron": "99 * * * *", "timeout_seconds": "soon"}
    )
    assert bad.status_code == 422 and "must be a whole number" in bad.text
    bad = panel.submit("/schedules", {**SCHEDULE_FORM, "cron": "99 * * * *"})
    assert bad.status_code == 422 and 'aria-describedby="cron-error"' in bad.text
    created = panel.submit("/schedules", SCHEDULE_FORM)
    assert created.status_code == 303
    path = created.headers["Location"]
    stored = fakes.SCHEDULES[int(path.rsplit("/", 1)[-1])]
    assert stored["target"]["kwargs"] == {"target_format": "csv"}
    assert (
        stored["timeout_seconds"] == 120 and stored["missed_run_policy"] == "run_once"
    )
    preview = panel.get("/schedules/preview?cron=*/15 * * * *&timezone=UTC").json()
    assert len(preview["fire_times"]) == 5
    invalid = panel.get("/schedules/preview?cron=nope&timezone=UTC")
    assert invalid.status_code == 422 and "cron" in invalid.json()["errors"]
    assert panel.submit(path + "/pause").status_code == 303
    assert stored["enabled"] is False
    assert panel.submit(path + "/resume").status_code == 303
    assert panel.submit(path + "/run").status_code == 303
    page = panel.get(path).text
    assert "data-run-id" in page and "succeeded" in page
    assert panel.submit(path, {**SCHEDULE_FORM, "name": "renamed"}).status_code == 303
    assert stored["name"] == "renamed"
    assert "renamed" in panel.get("/schedules").text
    assert panel.submit(path + "/delete").headers["Location"] == "/schedules"
    assert fakes.SCHEDULES == {}


# -- tokens and system ----------------------------------------------------------------


def test_a_token_made_in_the_panel_is_shown_once_and_works(app: App) -> None:
    panel = app.admin()
    page = panel.submit("/tokens", {"name": "laptop"})
    assert page.status_code == 201
    token = page.text.split('<code id="new-token">')[1].split("</code>")[0]
    assert app.api(token).get("/api/v1/conversions").status_code == 200
    listing = panel.get("/tokens").text
    assert "laptop" in listing and token not in listing
    assert panel.submit("/tokens", {"name": ""}).status_code == 422


def test_the_system_page_says_what_it_cannot_reach(app: App) -> None:
    panel = app.admin()
    page = panel.get("/system")
    assert page.status_code == 200
    assert "management API did not answer" in page.text
    assert (
        panel.submit("/system/dead-letters/replay", {"queue": "rpc-users"}).status_code
        == 400
    )


# -- live updates ---------------------------------------------------------------------


def test_job_events_reach_the_owners_and_admins_sockets_only(app: App) -> None:
    app.create_member()
    member = app.session()
    member.login("member@example.com", "member password")
    admin = app.admin()
    member_ws = ws_connect(app, dict(member.cookies))
    admin_ws = ws_connect(app, dict(admin.cookies))
    try:
        assert ws_call(member_ws, "subscribe", channel="jobs")["success"]
        assert ws_call(admin_ws, "subscribe", channel="jobs")["success"]
        admins_job = (
            app.api(app.token())
            .post(
                "/api/v1/conversions",
                json={
                    "file_id": upload_page(admin).json()["id"],
                    "target_format": "json",
                },
            )
            .json()
        )
        members_file = upload_page(member).json()
        members_job_id = (
            member.submit(
                "/conversions", {"file_id": members_file["id"], "target_format": "json"}
            )
            .headers["Location"]
            .rsplit("/", 1)[-1]
        )
        with ClusterRpcProxy(app.config) as rpc:
            rpc.conversions.advance(members_job_id, "running", 50.0)

        def job_events(ws: Any, until: str) -> list[tuple[str, str]]:
            seen = []
            while True:
                frame = json.loads(ws.recv())
                if frame.get("event") == "job":
                    seen.append((frame["data"]["id"], frame["data"]["state"]))
                    if seen[-1] == (until, "running"):
                        return seen

        assert job_events(member_ws, members_job_id) == [
            (members_job_id, "queued"),
            (members_job_id, "running"),
        ]
        assert job_events(admin_ws, members_job_id) == [
            (admins_job["id"], "queued"),
            (members_job_id, "queued"),
            (members_job_id, "running"),
        ]
    finally:
        member_ws.close()
        admin_ws.close()


# -- helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/users?page=2", "/users?page=2"),
        (None, "/"),
        ("", "/"),
        ("https://evil.example", "/"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("users", "/"),
        ("/ok\r\nSet-Cookie: x", "/"),
    ],
)
def test_safe_next_keeps_only_paths_of_this_site(
    target: str | None, expected: str
) -> None:
    assert safe_next(target) == expected


def test_options_from_form_nests_and_types_the_fields() -> None:
    form = MultiDict(
        {
            "read.header": "true",
            "read.null_values": "NA, -",
            "write.delimiter": "|",
            "write.x": "",
            "file_id": "1",
        }
    )
    assert options_from_form(form) == {
        "read": {"header": True, "null_values": ["NA", "-"]},
        "write": {"delimiter": "|"},
    }


def test_file_names_keep_only_their_last_part() -> None:
    assert clean_file_name("C:\\Users\\ann\\data.csv") == "data.csv"
    assert clean_file_name("a\x00b.csv") == "a_b.csv"
    with pytest.raises(Exception, match="needs a name"):
        clean_file_name("../")


def test_schedule_forms_report_fields_of_the_wrong_type() -> None:
    spec, errors = schedule_from_form(
        MultiDict(
            {
                "name": "x",
                "cron": "* * * * *",
                "target_kind": "event",
                "target.event_type": "tick",
                "target.payload": "[1]",
                "jitter_seconds": "a",
            }
        )
    )
    assert errors == {
        "target.payload": "must be a JSON object",
        "jitter_seconds": "must be a whole number",
    }
    assert spec["target"] == {"kind": "event", "event_type": "tick", "payload": {}}


def test_openapi_paths_from_werkzeug_rules() -> None:
    path, parameters = openapi_path("/api/v1/users/<int:user_id>/x/<job_id>")
    assert path == "/api/v1/users/{user_id}/x/{job_id}"
    assert [p["schema"]["type"] for p in parameters] == ["integer", "string"]


def test_error_pages_keep_the_callers_navigation(app: App) -> None:
    page = app.admin().get("/users/999")
    assert page.status_code == 404
    assert 'href="/schedules"' in page.text and "Log out" in page.text
