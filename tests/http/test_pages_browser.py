"""The pages in a real browser: Playwright driving Debian's chromium (no browser download).

Log in with the token, find the studies just sent with dcmtk storescu in the worklist, most urgent
first with their priority badges and main findings; retry a dead job from the failures page and see
its state change. The worklist screenshot in the README is this test's (``PACS_TRIAGE_SCREENSHOT``
names where to copy it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from storage.models import Event, Job
from tests.paths import TESTDATA
from tests.support.http import (
    ADMIN_TOKEN,
    HEAD_CT,
    MR,
    HttpNode,
    as_worker,
    queued_job,
    start_http_node,
    study_uid,
)
from tests.support.peers import need_peer, storescu

pytestmark = pytest.mark.peer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))[:3]
MAX_SCREENSHOT_BYTES = 200_000


def test_worklist_and_retry_from_the_failures_page(http_nodes: list[HttpNode], tmp_path: Path) -> None:
    need_peer(Path(CHROMIUM).exists(), "Debian's chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    node = start_http_node(tmp_path)
    http_nodes.append(node)
    db = node.service.database_url

    def send(files: list[Path]) -> tuple[str, int]:
        out = storescu(node.service.port, files)
        assert out.returncode == 0, out.stderr
        uid = study_uid(files)
        return uid, queued_job(db, uid)

    routine_uid, routine_job = send(ABDOMEN)
    as_worker(db, routine_job, succeed=True, priority=0, summary="no finding above the thresholds")
    stat_uid, stat_job = send(HEAD_CT)
    as_worker(db, stat_job, succeed=True, priority=2, summary="lesion 14.2 mL, p=0.97 (critical)")
    dead_uid, dead_job = send(MR)
    as_worker(db, dead_job, succeed=False)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 420})
            page.goto(node.base_url + "/worklist")
            assert "/login" in page.url
            page.fill("input[name=token]", ADMIN_TOKEN)
            with page.expect_navigation():
                page.click("button[type=submit]")
            assert page.url.endswith("/worklist")

            rows = page.locator("table.worklist tr[data-study-id]")
            assert rows.count() == 3
            uids = [rows.nth(i).locator(".uid").inner_text() for i in range(3)]
            assert uids == [stat_uid, routine_uid, dead_uid], (
                "most urgent first, studies without a result last"
            )
            assert rows.nth(0).locator(".badge").inner_text().strip().lower() == "stat"
            assert "lesion 14.2 mL" in rows.nth(0).inner_text()
            assert rows.nth(1).locator(".badge").inner_text().strip().lower() == "routine"
            assert rows.nth(2).locator(".badge").inner_text().strip().lower() == "pending"
            assert rows.nth(2).locator("td.state").inner_text() == "dead"
            shot = tmp_path / "worklist.png"
            page.screenshot(path=str(shot), full_page=True)
            assert (
                shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < MAX_SCREENSHOT_BYTES
            )
            if target := os.environ.get("PACS_TRIAGE_SCREENSHOT"):
                shutil.copyfile(shot, target)

            page.click("form.filters button")  # "any" everywhere: the same three
            assert page.locator("table.worklist tr[data-study-id]").count() == 3
            page.select_option("select[name=priority]", "stat")
            page.click("form.filters button")
            assert page.locator("table.worklist tr[data-study-id] .uid").all_inner_texts() == [stat_uid]

            page.goto(node.base_url + "/failures")
            row = page.locator(f"table.failures-jobs tr[data-job-id='{dead_job}']")
            assert row.locator("td.state").inner_text() == "dead"
            with page.expect_navigation():
                row.locator("button.action", has_text="Retry").click()
            assert page.locator(f"table.failures-jobs tr[data-job-id='{dead_job}']").count() == 0

            page.goto(node.base_url + "/worklist")
            dead_row = page.locator("table.worklist tr[data-study-id]").nth(2)
            assert dead_row.locator("td.state").inner_text() == "queued"
            dead_row.locator("a").click()
            page.wait_for_url("**/studies/*")
            assert page.locator(f"tr[data-job-id='{dead_job}'] td.state").inner_text() == "queued"
            assert "retried by operator" in page.locator("table.timeline").inner_text()
        finally:
            browser.close()

    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(Job.state).where(Job.id == dead_job)).scalar_one() == "queued"
            audit = conn.execute(
                select(Event.detail).where(
                    Event.entity == "job", Event.entity_id == str(dead_job), Event.kind == "operator"
                )
            ).scalar_one()
            assert '"by": "ops-admin"' in audit and '"action": "retry"' in audit
    finally:
        engine.dispose()
