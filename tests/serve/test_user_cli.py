"""`headrace user`: add, set a password (the one-time one replaced), list, remove."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from headrace.cli.main import app
from headrace.serve.users import UserStore


def _headrace(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=stdin)
    return result.exit_code, result.stdout + result.stderr


def test_a_one_time_password_is_replaced_and_sessions_end(tmp_path: Path) -> None:
    store = str(tmp_path / "bank.duckdb")
    code, out = _headrace("user", "add", "ops", "--role", "admin", "--store", store)
    assert code == 0, out
    first = out.split("one-time password: ")[1].split()[0]
    users = UserStore(tmp_path / "bank.duckdb.users.sqlite")
    try:
        user = users.verify_password("ops", first)
        assert user is not None
        session_id, _ = users.create_session(user, ttl_s=600)
    finally:
        users.close()

    code, out = _headrace(
        "user", "password", "ops", "--password-stdin", "--store", store, stdin="correct horse\n"
    )
    assert code == 0, out
    assert "sessions ended" in out
    users = UserStore(tmp_path / "bank.duckdb.users.sqlite")
    try:
        assert users.verify_password("ops", first) is None
        assert users.verify_password("ops", "correct horse") is not None
        assert users.session(session_id) is None  # logged out everywhere
    finally:
        users.close()

    code, out = _headrace("user", "password", "ops", "--store", store)  # a generated one
    assert code == 0, out
    assert "one-time password: " in out
    code, out = _headrace(
        "user", "password", "ops", "--password-stdin", "--store", store, stdin="short\n"
    )
    assert code != 0
    assert "password too short" in out
    code, out = _headrace("user", "password", "nobody", "--store", store)
    assert code != 0
    assert "no user 'nobody'" in out
    assert _headrace("user", "list", "--store", store)[1].strip() == "ops\tadmin"
