"""The JSON API (``/api/v1``), route by route, against the running web service with
the real users service and the conversions/scheduler stand-ins (``fakes.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from framework.standalone.rpc import ClusterRpcProxy
from framework.storage import FileStorage

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, App

CSV = b"name,count\nann,1\nbob,2\n"


@pytest.fixture
def admin(app: App) -> Any:
    return app.api(app.token())


@pytest.fixture
def member(app: App) -> Any:
    app.create_member()
    return app.api(app.token("member@example.com", "member password"))


def upload(api: Any, name: str = "data.csv", body: bytes = CSV) -> dict[str, Any]:
    response = api.post(f"/api/v1/files?name={name}", data=body)
    assert response.status_code == 201, response.text
    return response.json()


def start(
    api: Any, file_id: str, target: str = "parquet", **options: Any
) -> dict[str, Any]:
    response = api.post(
        "/api/v1/conversions",
        json={"file_id": file_id, "target_format": target, "options": options},
    )
    assert response.status_code == 202, response.text
    return response.json()


def problem(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in response.text
    return body


# -- tokens ----------------------------------------------------------------------------


def test_a_token_is_given_for_a_right_password_only(app: App) -> None:
    response = requests.post(
        app.base_url + "/api/v1/tokens",
        json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "name": "ci"},
        timeout=10,
    )
    assert response.status_code == 201
    body = response.json()
    assert body["token"].startswith(body["prefix"]) and body["name"] == "ci"
    wrong = requests.post(
        app.base_url + "/api/v1/tokens",
        json={"email": ADMIN_EMAIL, "password": "nope", "name": "ci"},
        timeout=10,
    )
    assert problem(wrong, 401)["detail"] == "invalid email or password"


def test_a_token_request_with_bad_fields_lists_them(app: App) -> None:
    response = app.api().post("/api/v1/tokens", json={"email": ADMIN_EMAIL, "extra": 1})
    errors = problem(response, 422)["errors"]
    assert set(errors) == {"password", "name", "extra"}
    assert problem(app.api().post("/api/v1/tokens", data="{"), 400)


# -- files and conversions ----------------------------------------------------------------


def test_an_upload_is_streamed_into_storage_and_registered(
    app: App, admin: Any
) -> None:
    file = upload(admin)
    assert file == {**file, "name": "data.csv", "size": len(CSV), "format": "csv"}
    stored = app.conversions  # the stand-in recorded where the bytes went
    from . import fakes

    key = fakes.FILES[file["id"]]["storage_key"]
    storage = FileStorage(app.config["STORAGE_URL"])
    with storage.open_read(key) as stream:
        assert stream.read() == CSV
    assert stored is not None


def test_a_multipart_upload_works_too(admin: Any) -> None:
    response = admin.post(
        "/api/v1/files", files={"file": ("sheet.csv", CSV, "text/csv")}
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "sheet.csv"


def test_an_upload_over_the_limit_is_a_413_and_leaves_nothing(
    app: App, admin: Any
) -> None:
    body = b"x" * (1024 * 1024 + 1)
    assert problem(admin.post("/api/v1/files?name=big.csv", data=body), 413)

    def chunks() -> Any:  # no Content-Length: the limit holds while streaming
        for _ in range(20):
            yield b"y" * 65536

    assert problem(admin.post("/api/v1/files?name=big.csv", data=chunks()), 413)
    storage = FileStorage(app.config["STORAGE_URL"])
    assert storage.fs.ls(storage.root) == []


def test_an_upload_without_a_name_or_body_is_refused(admin: Any) -> None:
    assert problem(admin.post("/api/v1/files", data=CSV), 400)
    assert problem(admin.post("/api/v1/files?name=a.csv", data=b""), 400)
    assert problem(admin.post("/api/v1/files?name=a.unknown", data=CSV), 422)


def test_file_names_are_labels_not_paths(admin: Any) -> None:
    file = upload(admin, name="..%2F..%2Fetc%2Fpasswd.csv")
    assert file["name"] == "passwd.csv"


def test_conversions_are_started_listed_and_fetched(admin: Any) -> None:
    file = upload(admin)
    job = start(admin, file["id"], write={"compression": "zstd"})
    assert job["state"] == "queued" and job["target_format"] == "parquet"
    listed = admin.get("/api/v1/conversions?state=queued&per_page=5").json()
    assert listed["items"] == [job] and listed["total"] == 1 and listed["per_page"] == 5
    assert admin.get("/api/v1/conversions?state=failed").json()["total"] == 0
    assert admin.get(f"/api/v1/conversions/{job['id']}").json() == job


def test_the_conversions_list_is_walked_page_after_page_by_its_cursor(
    admin: Any,
) -> None:
    file = upload(admin)
    jobs = [start(admin, file["id"]) for _ in range(5)]
    first = admin.get("/api/v1/conversions?per_page=2").json()
    start(admin, file["id"])  # a newer job does not shift the pages after

    second = admin.get(
        f"/api/v1/conversions?per_page=2&page=2&after={first['next_cursor']}"
    ).json()
    last = admin.get(
        f"/api/v1/conversions?per_page=2&page=3&after={second['next_cursor']}"
    ).json()

    newest_first = [job["id"] for job in reversed(jobs)]
    assert [job["id"] for job in first["items"]] == newest_first[:2]
    assert [job["id"] for job in second["items"]] == newest_first[2:4]
    assert [job["id"] for job in last["items"]] == newest_first[4:]
    assert second["page"] == 2 and last["next_cursor"] is None
    assert problem(admin.get("/api/v1/conversions?after=nope"), 422)["errors"]["after"]
    assert problem(admin.get("/api/v1/conversions?after="), 422)["errors"]["after"]


def test_bad_conversion_requests_are_422_with_field_errors(admin: Any) -> None:
    file = upload(admin)
    bad_option = admin.post(
        "/api/v1/conversions",
        json={
            "file_id": file["id"],
            "target_format": "parquet",
            "options": {"write": {"compression": "gzip"}},
        },
    )
    assert "write.compression" in problem(bad_option, 422)["errors"]
    assert problem(
        admin.post(
            "/api/v1/conversions", json={"file_id": file["id"], "target_format": "pdf"}
        ),
        422,
    )
    assert problem(admin.get("/api/v1/conversions?page=0"), 422)["errors"]["page"]
    assert problem(
        admin.post(
            "/api/v1/conversions", json={"file_id": "nope", "target_format": "csv"}
        ),
        404,
    )


def test_cancel_retry_and_delete(app: App, admin: Any) -> None:
    job = start(admin, upload(admin)["id"])
    cancelled = admin.post(f"/api/v1/conversions/{job['id']}/cancel")
    assert cancelled.json()["state"] == "cancelled"
    assert problem(admin.post(f"/api/v1/conversions/{job['id']}/cancel"), 409)
    assert (
        admin.post(f"/api/v1/conversions/{job['id']}/retry").json()["state"] == "queued"
    )
    assert admin.delete(f"/api/v1/conversions/{job['id']}").status_code == 204
    assert problem(admin.get(f"/api/v1/conversions/{job['id']}"), 404)


def test_the_output_is_streamed_with_its_file_name(app: App, admin: Any) -> None:
    job = start(admin, upload(admin, name="report ü.csv")["id"])
    storage = FileStorage(app.config["STORAGE_URL"])
    key = storage.new_key()
    storage.write_bytes(key, b"PAR")
    assert problem(admin.get(f"/api/v1/conversions/{job['id']}/output"), 404)
    with ClusterRpcProxy(app.config) as rpc:
        rpc.conversions.advance(job["id"], "succeeded", 100.0, key)
    response = admin.get(f"/api/v1/conversions/{job['id']}/output")
    assert response.status_code == 200
    assert response.content == b"PAR"
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="report _.parquet"')
    assert "filename*=UTF-8''report%20%C3%BC.parquet" in disposition


def test_members_see_and_touch_only_their_own_jobs(
    app: App, admin: Any, member: Any
) -> None:
    theirs = start(admin, upload(admin)["id"])
    mine = start(member, upload(member)["id"])
    assert [job["id"] for job in member.get("/api/v1/conversions").json()["items"]] == [
        mine["id"]
    ]
    assert {job["id"] for job in admin.get("/api/v1/conversions").json()["items"]} == {
        theirs["id"],
        mine["id"],
    }
    for method, suffix in (
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/retry"),
        ("DELETE", ""),
        ("GET", "/output"),
    ):
        for job_id in (theirs["id"], "00000000-0000-4000-8000-000000000000"):
            # Someone else's job and no job at all: the same answer.
            response = member.request(method, f"/api/v1/conversions/{job_id}{suffix}")
            assert problem(response, 404)["detail"] == "no such conversion"
    others_file = admin.get(f"/api/v1/conversions/{theirs['id']}").json()["input"][
        "file_id"
    ]
    refused = member.post(
        "/api/v1/conversions", json={"file_id": others_file, "target_format": "json"}
    )
    assert problem(refused, 404)
    assert admin.get(f"/api/v1/conversions/{theirs['id']}").json()["state"] == "queued"


def test_formats_come_from_the_conversions_service(admin: Any) -> None:
    formats = admin.get("/api/v1/formats").json()
    assert {f["name"] for f in formats["formats"]} >= {"csv", "parquet"}
    assert ["csv", "parquet"] in formats["pairs"]


# -- users ---------------------------------------------------------------------------


def test_users_are_created_listed_changed_and_deleted(admin: Any) -> None:
    created = admin.post(
        "/api/v1/users",
        json={
            "email": "ann@example.com",
            "password": "password1",
            "display_name": "Ann",
        },
    )
    assert created.status_code == 201
    user = created.json()
    assert created.headers["Location"] == f"/api/v1/users/{user['id']}"
    listed = admin.get("/api/v1/users?text=ann").json()
    assert [u["id"] for u in listed["items"]] == [user["id"]]
    changed = admin.patch(
        f"/api/v1/users/{user['id']}", json={"display_name": "Annie", "role": "admin"}
    )
    assert changed.json() == {
        **changed.json(),
        "display_name": "Annie",
        "role": "admin",
    }
    assert admin.get(f"/api/v1/users/{user['id']}").json()["display_name"] == "Annie"
    assert admin.delete(f"/api/v1/users/{user['id']}").status_code == 204
    assert problem(admin.get(f"/api/v1/users/{user['id']}"), 404)


def test_user_errors_are_problems(admin: Any) -> None:
    body = {"email": "not-an-email", "password": "short", "display_name": "X"}
    errors = problem(admin.post("/api/v1/users", json=body), 422)["errors"]
    assert set(errors) == {"email", "password"}
    taken = {"email": ADMIN_EMAIL, "password": "password1", "display_name": "X"}
    assert problem(admin.post("/api/v1/users", json=taken), 409)
    assert problem(admin.patch("/api/v1/users/1", json={"role": "root"}), 422)
    assert problem(admin.patch("/api/v1/users/1", json={"display_name": None}), 422)
    assert problem(admin.get("/api/v1/users/999"), 404)


def test_an_admin_cannot_lock_themselves_out(admin: Any) -> None:
    me = admin.get("/api/v1/users?text=admin@").json()["items"][0]
    assert problem(
        admin.patch(f"/api/v1/users/{me['id']}", json={"is_active": False}), 409
    )
    assert problem(
        admin.patch(f"/api/v1/users/{me['id']}", json={"role": "member"}), 409
    )
    assert problem(admin.delete(f"/api/v1/users/{me['id']}"), 409)


def test_an_admin_resets_a_password_and_the_users_sessions_and_tokens_end(
    app: App, admin: Any
) -> None:
    user = app.create_member()
    panel = app.session()
    assert panel.login("member@example.com", "member password").status_code == 303
    api = app.api(app.token("member@example.com", "member password"))
    assert api.get("/api/v1/conversions").status_code == 200
    secret = "a fresh secret"

    reset = admin.post(
        f"/api/v1/users/{user['id']}/password", json={"password": secret}
    )

    assert reset.status_code == 200, reset.text
    assert reset.json()["id"] == user["id"] and secret not in reset.text
    assert api.get("/api/v1/conversions").status_code == 401
    assert panel.get("/conversions", allow_redirects=False).status_code == 303
    assert app.session().login("member@example.com", secret).status_code == 303
    assert app.session().login("member@example.com", "member password").status_code == (
        401
    )


def test_a_password_reset_is_for_admins_and_follows_the_password_rules(
    app: App, admin: Any, member: Any
) -> None:
    target = admin.get("/api/v1/users?text=member@").json()["items"][0]
    url = f"/api/v1/users/{target['id']}/password"
    body = {"password": "a fresh secret"}
    assert problem(app.api().post(url, json=body), 401)
    assert problem(member.post(url, json=body), 403)
    weak = problem(admin.post(url, json={"password": "short"}), 422)
    assert set(weak["errors"]) == {"password"} and "short" not in str(weak)
    assert set(problem(admin.post(url, json={}), 422)["errors"]) == {"password"}
    assert problem(admin.post("/api/v1/users/999/password", json=body), 404)
    me = admin.get("/api/v1/users?text=admin@").json()["items"][0]
    assert problem(admin.post(f"/api/v1/users/{me['id']}/password", json=body), 409)
    # Nothing was reset: the member's token still works.
    assert member.get("/api/v1/conversions").status_code == 200


# -- schedules -------------------------------------------------------------------------

SCHEDULE = {
    "name": "nightly export",
    "cron": "0 2 * * *",
    "timezone": "Europe/Paris",
    "target": {
        "kind": "rpc",
        "service": "conversions",
        "method": "export_users",
        "kwargs": {},
    },
}


def test_schedules_are_created_changed_paused_run_and_deleted(admin: Any) -> None:
    created = admin.post("/api/v1/schedules", json=SCHEDULE)
    assert created.status_code == 201, created.text
    schedule = created.json()
    detail = admin.get(f"/api/v1/schedules/{schedule['id']}").json()
    assert len(detail["next_fire_times"]) == 5
    assert admin.get("/api/v1/schedules").json()["total"] == 1
    changed = admin.patch(
        f"/api/v1/schedules/{schedule['id']}", json={"cron": "*/5 * * * *"}
    )
    assert changed.json()["cron"] == "*/5 * * * *"
    assert (
        admin.post(f"/api/v1/schedules/{schedule['id']}/pause").json()["enabled"]
        is False
    )
    assert (
        admin.post(f"/api/v1/schedules/{schedule['id']}/resume").json()["enabled"]
        is True
    )
    run = admin.post(f"/api/v1/schedules/{schedule['id']}/run")
    assert run.status_code == 202
    runs = admin.get(f"/api/v1/schedules/{schedule['id']}/runs").json()
    assert [r["id"] for r in runs["items"]] == [run.json()["id"]]
    assert admin.delete(f"/api/v1/schedules/{schedule['id']}").status_code == 204
    assert problem(admin.get(f"/api/v1/schedules/{schedule['id']}"), 404)


def test_an_invalid_schedule_is_422_with_field_errors(admin: Any) -> None:
    bad = {**SCHEDULE, "cron": "61 * * * *", "timezone": "Mars/Olympus"}
    errors = problem(admin.post("/api/v1/schedules", json=bad), 422)["errors"]
    assert {"cron", "timezone"} <= set(errors)


# -- system and docs --------------------------------------------------------------------


def test_system_reports_what_it_could_not_reach(admin: Any) -> None:
    status = admin.get("/api/v1/system").json()
    assert status["services"] == [] and status["queues"] == []
    assert "did not answer" in status["broker_error"]


def test_the_openapi_document_describes_every_api_route(app: App, admin: Any) -> None:
    document = admin.get("/api/v1/openapi.json").json()
    assert document["openapi"] == "3.1.0"
    operations = {
        (method.upper(), path)
        for path, methods in document["paths"].items()
        for method in methods
    }
    for method, path in [
        ("POST", "/api/v1/tokens"),
        ("POST", "/api/v1/files"),
        ("GET", "/api/v1/conversions/{job_id}/output"),
        ("PATCH", "/api/v1/users/{user_id}"),
        ("POST", "/api/v1/schedules/{schedule_id}/run"),
        ("GET", "/api/v1/system"),
    ]:
        assert (method, path) in operations
    post_users = document["paths"]["/api/v1/users"]["post"]
    assert post_users["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/UserCreate"
    }
    assert "JobPayload" in document["components"]["schemas"]
    docs = app.admin().get("/docs")
    assert docs.status_code == 200 and "POST /api/v1/conversions" in docs.text


def test_an_output_no_longer_stored_is_a_404(app: App, admin: Any) -> None:
    job = start(admin, upload(admin)["id"])
    with ClusterRpcProxy(app.config) as rpc:
        rpc.conversions.advance(job["id"], "succeeded", 100.0, "0" * 32)
    response = admin.get(f"/api/v1/conversions/{job['id']}/output")
    assert (
        problem(response, 404)["detail"]
        == "this conversion's output is no longer stored"
    )
