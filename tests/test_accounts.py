"""Log-in, roles enforced in the services (forged calls refused), the audit trail (issue 15.1-3).

Runs on SQLite and PostgreSQL (the ``engine`` fixture)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from db_helpers import H, W, add_image, box, model_version
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from database import annotation_versions, audit, users
from database.models import AuditEvent
from database.session import session_scope
from database.versioning import RoleError
from services import (
    accounts,
    audit_trail,
    identity,
    model_admin,
    reading_labels,
    studies,
)

PASSWORD = "a long enough password"


def _scope(engine: Engine):  # noqa: ANN202
    def scope(write: bool = True):  # noqa: ANN202
        return session_scope(engine, write=write)

    return scope


def _account(engine: Engine, name: str, role: str) -> int:
    with session_scope(engine) as s:
        return int(users.create_user(s, name, role, PASSWORD, by=None).id)


def _actions(engine: Engine) -> list[tuple[str, str]]:
    with session_scope(engine, write=False) as s:
        return [(e.user_name, e.action) for e in reversed(audit.list_events(s))]


# ----------------------------------------------------------------------------- log-in
def test_password_is_stored_as_an_argon2id_hash_and_checked(engine: Engine) -> None:
    _account(engine, "Ada Admin", "admin")
    with session_scope(engine) as s:
        user = users.get_user(s, "Ada Admin")
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        assert users.authenticate(s, "Ada Admin", PASSWORD) is not None
        assert users.authenticate(s, "Ada Admin", PASSWORD + "x") is None
        assert users.authenticate(s, "Nobody", PASSWORD) is None
        with pytest.raises(users.AccountError, match="at least"):
            users.create_user(s, "Short", "annotator", "short", by=None)


def test_sign_in_wrong_password_refused_and_both_audited(engine: Engine) -> None:
    scope = _scope(engine)
    _account(engine, "Ann", "annotator")
    state: dict = {}
    with pytest.raises(identity.IdentityError, match="Wrong name or password"):
        identity.sign_in(state, "Ann", "not the password", scope)
    assert identity.current_user(state) is None
    who = identity.sign_in(state, "Ann", PASSWORD, scope)
    assert identity.current_user(state) == who and who.role == "annotator"
    identity.sign_out(state, scope)
    assert identity.current_user(state) is None
    assert _actions(engine) == [("Ann", "sign-in refused"), ("Ann", "sign-in"), ("Ann", "sign-out")]


def test_a_legacy_account_without_password_cannot_sign_in(engine: Engine) -> None:
    with session_scope(engine) as s:
        users.get_or_create_user(s, "Old Name", "radiologist")  # the name + role era
    with pytest.raises(identity.IdentityError):
        identity.sign_in({}, "Old Name", "", _scope(engine))


def test_session_times_out_after_the_idle_minutes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _account(engine, "Ann", "annotator")
    state: dict = {}
    identity.sign_in(state, "Ann", PASSWORD, _scope(engine))
    monkeypatch.setenv("INFMAP_SESSION_MINUTES", "5")
    state[identity.SEEN_KEY] -= 4 * 60
    assert identity.current_user(state) is not None  # 4 idle minutes: still in (and renewed)
    state[identity.SEEN_KEY] -= 6 * 60
    assert identity.current_user(state) is None and state[identity.TIMED_OUT_KEY]


def test_first_admin_once_only(engine: Engine) -> None:
    scope = _scope(engine)
    assert identity.needs_first_admin(scope)
    with pytest.raises(identity.IdentityError, match="differ"):
        identity.create_first_admin({}, "Root", PASSWORD, PASSWORD + "!", scope)
    state: dict = {}
    admin = identity.create_first_admin(state, "Root", PASSWORD, PASSWORD, scope)
    assert admin.role == "admin" and identity.current_user(state) == admin
    assert not identity.needs_first_admin(scope)
    with pytest.raises(identity.IdentityError, match="exists already"):
        identity.create_first_admin({}, "Mallory", PASSWORD, PASSWORD, scope)


def test_users_command_adds_resets_and_lists(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return users.main(["--database-url", database_url, *argv])

    assert run("add", "Ada", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n") == 0
    assert run("add", "Ada", "--role", "admin", "--password-stdin", stdin=PASSWORD) == 2
    assert run("add", "Bob", "--role", "annotator", stdin="short\n") == 2  # too short
    assert run("reset-password", "Ada", "--password-stdin", stdin="another long one\n") == 0
    assert run("list") == 0
    out = capsys.readouterr()
    assert "Ada\tadmin" in out.out and "exists already" in out.err and "at least" in out.err
    state: dict = {}
    from database.session import init_db

    engine = init_db(database_url)
    try:
        identity.sign_in(state, "Ada", "another long one", _scope(engine))
        assert _actions(engine)[:2] == [("command line", "user create"),
                                        ("command line", "password reset")]
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- roles
@pytest.fixture
def team(engine: Engine) -> dict[str, int]:
    return {role: _account(engine, f"The {role}", role) for role in identity.ROLES}


@pytest.fixture
def submitted(engine: Engine, team: dict[str, int]) -> tuple[int, int]:
    """A study with a submitted lung mask (and reading) by the annotator: (image id, version)."""
    with session_scope(engine) as s:
        image_id = int(add_image(s).id)
        model_version(s)
    out = studies.save_mask(_scope(engine), image_id, "lung", box(2, 2, H - 2, W - 2),
                            team["annotator"], "submitted", None)
    assert out.ok
    return image_id, int(out.version_id)


def test_forged_approve_by_an_annotator_is_refused(
    engine: Engine, team: dict[str, int], submitted: tuple[int, int]
) -> None:
    image_id, version = submitted
    scope = _scope(engine)
    for role in ("annotator", "researcher", "admin"):
        for action in ("approve", "return"):
            out = studies.review_head(scope, image_id, "lung", team[role], action, version, "c")
            assert not out.ok and "radiologist" in out.message, (role, action)
    with session_scope(engine, write=False) as s:
        assert annotation_versions.head_version(s, image_id, "lung").status == "submitted"
    assert studies.review_head(scope, image_id, "lung", team["radiologist"], "approve",
                               version).ok


def test_forged_reading_approval_by_an_annotator_is_refused(
    engine: Engine, team: dict[str, int], submitted: tuple[int, int]
) -> None:
    image_id, _ = submitted
    scope = _scope(engine)
    saved = reading_labels.save_reading(scope, image_id, "Normal", None, team["annotator"],
                                        "submitted", None)
    assert saved.ok
    refused = reading_labels.change_reading_status(scope, image_id, team["annotator"],
                                                   "approved", saved.version_id)
    assert not refused.ok and "radiologist" in refused.message


def test_model_actions_need_a_researcher_or_admin(
    engine: Engine, team: dict[str, int], tmp_path: Path
) -> None:
    scope = _scope(engine)
    checkpoint = tmp_path / "v2.pt"
    checkpoint.write_bytes(b"not used: refused before")
    with session_scope(engine) as s:
        model_version(s, "v1")
        other = model_version(s, "v2", activate=False)
        record = {"id": other.id, "version": "v2", "checkpoint": str(checkpoint),
                  "decision": None, "rejected": False, "lineage": {}, "metrics": {}}
    for role in ("annotator", "radiologist"):
        out = model_admin.activate(scope, record, team[role], confirmed_rejection=True)
        assert not out.ok and "researchers or admins" in out.message
        started = model_admin.start_finetune(scope, "sqlite://", team[role], 10, 0.5, 0, 0.01,
                                             None)
        assert not started.ok and started.run_id is None
    with session_scope(engine, write=False) as s:
        from database import model_versions, runs

        assert model_versions.get_active_model_version(s).version == "v1"
        assert runs.list_runs(s) == []
    done = model_admin.activate(scope, record, team["researcher"], confirmed_rejection=True)
    assert done.ok, done.message
    assert ("The researcher", "model activate") in _actions(engine)


def test_repredict_stop_and_export_are_refused_below_the_pages(
    engine: Engine, team: dict[str, int]
) -> None:
    """The Models page hides these buttons from the wrong roles; the services refuse too."""
    from database import runs
    from services import dataset_export

    scope = _scope(engine)
    with session_scope(engine) as s:
        active = model_version(s, "v1")
        run_id = int(runs.create_run(s, {"steps": 1}).id)
        info = studies.ModelInfo(active.id, "v1", active.checkpoint_path, None)
    run = {"id": run_id, "pid": None}
    for role in ("annotator", "radiologist"):
        with pytest.raises(RoleError):
            model_admin.start_repredict(scope, "sqlite://", info, None, team[role])
        with pytest.raises(RoleError):
            model_admin.stop_run(scope, run, team[role])
        with pytest.raises(RoleError):
            model_admin.mark_interrupted(scope, run_id, team[role])
    with pytest.raises(RoleError):
        dataset_export.dataset_zip(scope, team["annotator"])
    with pytest.raises(LookupError):  # not signed in (the page passes -1)
        dataset_export.dataset_zip(scope, -1)
    with session_scope(engine, write=False) as s:
        assert runs.get_run(s, run_id).status != "interrupted"
    model_admin.mark_interrupted(scope, run_id, team["researcher"])
    name, data, _ = dataset_export.dataset_zip(scope, team["radiologist"])
    assert name.endswith(".zip") and data[:2] == b"PK"


def test_managing_users_needs_an_admin(engine: Engine, team: dict[str, int]) -> None:
    scope = _scope(engine)
    for role in ("annotator", "radiologist", "researcher"):
        out = accounts.create_account(scope, team[role], f"New by {role}", "admin", PASSWORD)
        assert not out.ok and "admin" in out.message
        assert not accounts.reset_password(scope, team[role], "The admin", "x" * 12).ok
        with pytest.raises(RoleError):
            audit_trail.events(scope, team[role])
        with session_scope(engine) as s, pytest.raises(RoleError):
            users.create_user(s, "Direct", "admin", PASSWORD, by=users.get_user(s, "The " + role))
    made = accounts.create_account(scope, team["admin"], "Nina New", "annotator", PASSWORD)
    assert made.ok, made.message
    assert identity.sign_in({}, "Nina New", PASSWORD, scope).role == "annotator"


# ----------------------------------------------------------------------------- audit
def test_audit_lists_saves_reviews_and_filters_and_csv(
    engine: Engine, team: dict[str, int], submitted: tuple[int, int]
) -> None:
    image_id, version = submitted
    scope = _scope(engine)
    studies.review_head(scope, image_id, "lung", team["radiologist"], "approve", version)
    audit_trail.record(scope, team["radiologist"], "view", image_id, "review")
    rows = audit_trail.events(scope, team["admin"])
    assert [(r["user"], r["action"]) for r in rows] == [
        ("The radiologist", "view"), ("The radiologist", "approve"), ("The annotator", "submit"),
    ]
    assert {r["study"] for r in rows} == {image_id}
    only = audit_trail.events(scope, team["admin"], user_name="The annotator")
    assert [r["action"] for r in only] == ["submit"]
    approvals = audit_trail.events(scope, team["admin"], actions=("approve",))
    assert len(approvals) == 1
    csv_text = audit_trail.to_csv(rows)
    assert csv_text.splitlines()[0] == "time (UTC),user,action,study,detail"
    assert len(csv_text.strip().splitlines()) == 4
    formula = audit_trail.to_csv([{"user": "=cmd()", "action": "view", "detail": ""}])
    assert formula.splitlines()[1] == ",'=cmd(),view,,"  # text in a spreadsheet, not a formula


def test_the_audit_table_is_append_only_in_the_database_itself(
    engine: Engine, team: dict[str, int]
) -> None:
    with session_scope(engine) as s:
        audit.record(s, "view", users.get_user(s, "The admin"), image_id=None)
    for statement in ("UPDATE audit_events SET user_name = 'someone else'",
                      "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), session_scope(engine) as s:
            s.execute(text(statement))
    with pytest.raises(RuntimeError, match="append-only"), session_scope(engine) as s:
        event = s.query(AuditEvent).first()
        event.user_name = "someone else"
        s.flush()
    assert np.all([n != "someone else" for n, _ in _actions(engine)])
