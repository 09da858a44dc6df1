"""The gateway's web console in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium):
chat with the mesh, a memory told in the chat found with its provenance, the profile and counts, an entity, and
the delete button; a screenshot is saved to ``.data/test-artifacts/console.png``."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.helpers import Mesh, wait_until
from tests.integration.test_gateway import ADMIN, gateway  # noqa: F401 - the fixture

SCREENSHOT = ROOT / ".data" / "test-artifacts" / "console.png"


def _driver() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if not binary or not Path(driver_path).exists():
        pytest.fail("no chromium / chromedriver: `make test` installs Debian's chromium and chromium-driver with apt")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _wait_text(driver: Any, element_id: str, needle: str, timeout: float = 30) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def seen(d: Any) -> str | bool:
        value = str(d.find_element(By.ID, element_id).text)
        return value if needle in value else False

    try:
        found: str = WebDriverWait(driver, timeout).until(seen)
    except Exception as exc:
        last = driver.find_element(By.ID, element_id).text
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"#{element_id} never showed {needle!r}; last {last!r}, status {status!r}") from exc
    return found


async def test_the_console_chats_shows_memories_and_deletes(gateway: httpx.AsyncClient,  # noqa: F811
                                                            mesh: Mesh) -> None:
    base = str(gateway.base_url).rstrip("/")
    driver = await asyncio.to_thread(_driver)
    try:
        from selenium.webdriver.common.by import By

        def chat() -> None:
            driver.get(f"{base}/console?key={ADMIN}&user=carol")
            driver.find_element(By.ID, "message").send_keys("My dog Rex loves the beach at Nazare.")
            driver.find_element(By.ID, "send").click()
            _wait_text(driver, "chat-log", "ltm:")

        await asyncio.to_thread(chat)

        async def ingested() -> bool:
            return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = 'carol'") >= 1

        await wait_until(ingested, timeout=30, message="carol's turn ingested")
        async with mesh.pool.connection() as conn:
            cur = await conn.execute("SELECT name FROM ltm_entities WHERE user_id = 'carol' ORDER BY mentions DESC, "
                                     "name LIMIT 1")
            row = await cur.fetchone()
        assert row, "no entity of carol's turn"
        entity = str(row[0])

        def browse() -> None:
            driver.find_element(By.ID, "new-session").click()
            driver.find_element(By.ID, "message").send_keys("What does my dog love?")
            driver.find_element(By.ID, "send").click()
            _wait_text(driver, "chat-log", "ltm: hit")
            driver.find_element(By.ID, "memory-query").send_keys("dog beach")
            driver.find_element(By.ID, "search").click()
            memories = _wait_text(driver, "memories", "Rex")
            assert "from message" in memories and "in session" in memories  # provenance
            driver.find_element(By.ID, "summary-btn").click()
            _wait_text(driver, "summary", "profile")
            driver.find_element(By.ID, "entity-query").send_keys(entity)
            driver.find_element(By.ID, "entities-btn").click()
            _wait_text(driver, "entities", entity)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(SCREENSHOT))
            driver.find_element(By.ID, "delete").click()
            driver.switch_to.alert.accept()
            _wait_text(driver, "status", "deleted")

        await asyncio.to_thread(browse)
    finally:
        await asyncio.to_thread(driver.quit)
    assert SCREENSHOT.stat().st_size > 10_000
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'carol'") == 0
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = 'carol'") == 0
