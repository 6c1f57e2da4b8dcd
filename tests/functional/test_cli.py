"""The shlhost command: db upgrade, link create/list/show/revoke/qr."""

from __future__ import annotations

import json

import pytest

from shlhost.cli import cli
from shlhost.storage import migrate
from tests.conftest import fixture_path
from tests.helpers import decode_link, minimal_bundle, read_qr


def _create(runner, tmp_path, *args):
    record = tmp_path / "record.json"
    record.write_text(json.dumps(minimal_bundle()))
    result = runner.invoke(cli, ["link", "create", str(record), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_db_upgrade_reports_the_revision(runner):
    result = runner.invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"revision {migrate.head()}" in result.output


@pytest.mark.parametrize("command", [["show"], ["revoke"], ["qr", "-o", "x.png"], ["qr", "--viewer", "-o", "x.png"]])
def test_a_link_id_starting_with_a_dash_is_an_id_not_an_option(runner, command):
    """One link id in 64 starts with '-' (base64url): it must still name the link."""
    dashed = "-i" + "A" * 41
    result = runner.invoke(cli, ["link", command[0], dashed, *command[1:]])
    assert result.exit_code == 2 and f"no link {dashed}" in result.output, result.output


def test_link_create_list_show_revoke(runner, tmp_path, client):
    created = _create(runner, tmp_path, "--label", "From the CLI", "--passcode", "pw", "--max-uses", "2")
    assert created["flag"] == "P" and created["max_uses"] == 2 and created["label"] == "From the CLI"
    link = decode_link(created["shlink"])
    assert link["url"].endswith(created["id"])
    listing = runner.invoke(cli, ["link", "list"]).output
    assert created["id"] in listing and "active" in listing
    shown = json.loads(runner.invoke(cli, ["link", "show", created["id"]]).output)
    assert shown["status"] == "active" and "management_token" not in shown
    r = client.post(f"/shl/{created['id']}", json={"recipient": "cli test", "passcode": "pw"})
    assert r.status_code == 200
    result = runner.invoke(cli, ["link", "revoke", created["id"]])
    assert result.exit_code == 0
    assert client.post(f"/shl/{created['id']}", json={"recipient": "x", "passcode": "pw"}).status_code == 404
    assert json.loads(runner.invoke(cli, ["link", "show", created["id"]]).output)["status"] == "revoked"


def test_link_create_from_a_phr_fixture(runner):
    result = runner.invoke(cli, ["link", "create", str(fixture_path("JohnDoe.phr")), "--flags", "L"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["flag"] == "L"


def test_link_create_reads_the_passcode_from_stdin(runner, tmp_path, client):
    record = tmp_path / "r.json"
    record.write_text(json.dumps(minimal_bundle()))
    result = runner.invoke(cli, ["link", "create", str(record), "--passcode-stdin"], input="s3cret\n")
    created = json.loads(result.output)
    assert "s3cret" not in result.output
    assert client.post(f"/shl/{created['id']}", json={"recipient": "x", "passcode": "s3cret"}).status_code == 200


def test_link_create_refuses_bad_options(runner, tmp_path):
    record = tmp_path / "r.json"
    record.write_text(json.dumps(minimal_bundle()))
    result = runner.invoke(cli, ["link", "create", str(record), "--flags", "UP"])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(cli, ["link", "create", str(record), "--exp", "2000-01-01"])
    assert result.exit_code == 2 and "future" in result.output


def test_link_qr_png_and_svg(runner, tmp_path):
    created = _create(runner, tmp_path)
    png = tmp_path / "qr.png"
    assert runner.invoke(cli, ["link", "qr", created["id"], "-o", str(png)]).exit_code == 0
    [code] = read_qr(png.read_bytes())
    assert code.text == created["shlink"]
    viewer_png = tmp_path / "viewer.png"
    runner.invoke(cli, ["link", "qr", created["id"], "-o", str(viewer_png), "--viewer"])
    assert read_qr(viewer_png.read_bytes())[0].text == created["viewer_url"]
    svg = tmp_path / "qr.svg"
    assert runner.invoke(cli, ["link", "qr", created["id"], "-o", str(svg)]).exit_code == 0
    assert svg.read_text().startswith("<svg")


def test_unknown_link_is_a_clear_error(runner):
    result = runner.invoke(cli, ["link", "show", "nope"])
    assert result.exit_code == 2 and "no link" in result.output
