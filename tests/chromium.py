"""Headless Debian chromium for the report test: dump a page's DOM after its scripts ran, or screenshot it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def chromium(page: Path, profile: Path, screenshot: Path | None = None, size=(1400, 900), budget_ms=8000) -> str:
    """The DOM of `page` once its scripts have had `budget_ms` of virtual time, or (given a path) a screenshot."""
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
           f"--virtual-time-budget={budget_ms}"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([*cmd, Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or (screenshot and not Path(screenshot).exists()):
        raise AssertionError(f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def report_opening(report: Path, suffix: str, out: Path) -> Path:
    """A copy of a Snakemake report that opens, as a click in its menu would, the result whose path ends
    with `suffix` (the report keeps every view behind clicks; the copy adds only this script)."""
    script = """<script>
const cbOpen = setInterval(() => {
  if (typeof app === "undefined") return;
  clearInterval(cbOpen);
  const path = Object.keys(results).find((p) => p.endsWith(SUFFIX));
  const category = Object.keys(categories).find((c) => JSON.stringify(categories[c]).includes(JSON.stringify(path)));
  if (category) app.showCategory(category);
  const html = results[path].mime_type === "text/html";
  setTimeout(() => app.setView({content: html ? "html" : "img", contentPath: results[path].data_uri, resultPath: path}), 50);
}, 50);
</script></body>""".replace("SUFFIX", json.dumps(suffix))
    text = report.read_text(encoding="utf-8")
    head, sep, tail = text.rpartition("</body>")
    if not sep:
        raise AssertionError(f"{report}: no </body>")
    out.write_text(head + script + tail, encoding="utf-8")
    return out


def data_uri_payload(dom: str, tag: str, mime: str) -> bytes:
    """The decoded bytes of the first `tag` element whose src is a data: URI of type `mime`."""
    m = re.search(rf'<{tag}[^>]*\bsrc="data:{re.escape(mime)};[^"]*?base64,([^"]+)"', dom)
    if not m:
        raise AssertionError(f"no <{tag} src=data:{mime}...> in the page")
    return base64.b64decode(m.group(1))
