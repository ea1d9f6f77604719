"""/docs (Swagger UI) and /redoc (ReDoc) work without internet (issue 28): their scripts and styles are
served by the app itself. Each page is rendered in headless Chromium (Debian's `chromium` package) that
can reach no host but this machine, and the rendered page must list every operation of the API.

Without Chromium the test fails, saying how to install it; RECS_NO_BROWSER=1 skips it instead."""

import os
import re
import shutil
import subprocess
from urllib.parse import urlparse

import pytest

from http_helpers import ServerThread, get, publish_small
from recommend.serving.live import LiveVersion
from recommend.serving.service import create_app
from recommend.serving.settings import ServeSettings
from recommend.serving.versions import EmbeddedVersions

V1 = "20260101T000000-aaaa"
PAGES = ("/docs", "/redoc")
# what a page loads (a link to click is not loaded): scripts, styles, icons, images
LOADS = re.compile(r"<(?:script|link|img)\b[^>]*?\b(?:src|href)=\"([^\"]*)\"")


def _browser() -> str:
    if os.environ.get("RECS_NO_BROWSER") == "1":
        pytest.skip("RECS_NO_BROWSER=1: the headless-browser check is off")
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("no `chromium` on PATH: install Debian's package (apt-get install -y chromium), "
                    "or set RECS_NO_BROWSER=1 to skip this check")
    return browser


def _render(browser: str, urls: list[str], profiles) -> list[str]:
    """Each URL's DOM after its scripts ran (one Chromium per URL, in parallel). Every host name but
    the local ones resolves to nothing, so a page that loads its scripts from a CDN stays empty even
    on a machine with internet (CI)."""
    procs = [subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--disable-quic", "--no-first-run", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync",
                               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                               f"--user-data-dir={profiles.mktemp('chromium')}", "--virtual-time-budget=10000",
                               "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for url in urls]
    doms = []
    for url, proc in zip(urls, procs):
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        assert proc.returncode == 0 and out.strip(), f"chromium could not render {url} ({proc.returncode}): {err[-2000:]}"
        doms.append(out)
    return doms


def _local(url: str) -> bool:
    return urlparse(url).hostname in (None, "127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = EmbeddedVersions(tmp_path_factory.mktemp("docs") / "store", "t")
    publish_small(store, V1)
    settings = ServeSettings(poll_s=0.2)
    with ServerThread(create_app(LiveVersion(store, poll_s=0.2, freeze=True), settings, encoder=None), settings) as server:
        yield server.port


def test_docs_and_redoc_render_offline_and_list_every_operation(served, tmp_path_factory):
    browser = _browser()
    port = served
    status, schema, _ = get(port, "/openapi.json")
    operations = {(path, op["operationId"]) for path, methods in schema["paths"].items() for op in methods.values()}
    assert {"/users/{user_id}", "/users/batch", "/items", "/items/{item_id}/similar", "/search", "/versions", "/health",
            "/metrics"} == {
        path for path, _ in operations}

    for page in PAGES:  # the pages as served: every URL in them is this server's, and each asset answers
        status, html, _ = get(port, page)
        assert status == 200 and not re.search(r"https?://", html), (page, html)
        assets = LOADS.findall(html)
        assert assets and all(url.startswith("/") for url in assets), (page, assets)
        for url in assets:
            status, body, headers = get(port, url)
            assert status == 200 and len(body) > 1000, (page, url, status)

    swagger, redoc = _render(browser, [f"http://127.0.0.1:{port}{page}" for page in PAGES], tmp_path_factory)
    for path, operation in sorted(operations):
        assert f'data-path="{path}"' in swagger and f'id="operations-default-{operation}"' in swagger, (
            f"Swagger UI at /docs does not list {path}: did its scripts load?\n{swagger[:3000]}")
        assert f">{path}<" in redoc and f'id="operation/{operation}"' in redoc, (
            f"ReDoc at /redoc does not list {path}: did its script load?\n{redoc[:3000]}")
    for page, dom in zip(PAGES, (swagger, redoc)):  # nor did a script add anything loaded from elsewhere
        loaded = LOADS.findall(dom)
        assert loaded and all(_local(url) for url in loaded), (page, [u for u in loaded if not _local(u)])
        assert "cdn.jsdelivr" not in dom and "fonts.googleapis" not in dom, page


def test_the_docs_assets_need_the_api_key_as_docs_does(tmp_path):
    settings = ServeSettings(poll_s=0.2)
    app = create_app(LiveVersion(EmbeddedVersions(tmp_path / "store", "t"), poll_s=0.2), settings, api_key="s3cret", encoder=None)
    with ServerThread(app, settings) as server:
        for path in ("/docs", "/redoc", "/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/redoc.standalone.js"):
            assert get(server.port, path)[0] == 401, path
            assert get(server.port, path, {"Authorization": "Bearer s3cret"})[0] == 200, path
