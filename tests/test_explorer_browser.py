"""The metric explorer in Chromium: a counter charted as its rate, a `_bucket` series as a
percentile from its `le` buckets, and where a fresh agent's data begins marked on the 1h range.
The fixtures (and their skip/fail rules for a missing Chromium) are the dashboard tests'."""

from __future__ import annotations

import time

import pytest

from tests.test_dashboard_browser import TIMEOUT_MS, agents, browser, figure, open_page, post

__all__ = ["agents", "browser", "open_page"]  # fixtures, used by name


async def test_counters_as_rates_buckets_as_percentiles_and_where_data_begins(agents, open_page):
    agent = await agents()
    # ten minutes of data in the 1 h range's 12 s steps: one post per step (4 jobs, and
    # per-le bucket deltas: 8 observations <= 0.1, 2 more <= 1)
    first = (int(time.time()) - 600) // 12 * 12
    steps = [first + 12 * i + 1 for i in range(45)]
    await post(agent, [{"name": "jobs_total", "kind": "counter", "value": 4, "ts": ts} for ts in steps])
    await post(agent, [{"name": "rt_seconds_bucket", "kind": "counter", "value": v, "ts": ts, "tags": {"le": le}}
                       for ts in steps for le, v in (("0.1", 8), ("1", 10), ("+Inf", 10))])
    assert await agent.flush(5)
    page = await open_page(agent.server_url + "/#metrics?names=jobs_total&names=rt_seconds_bucket")
    for name in ("jobs_total", "rt_seconds_bucket"):
        await page.wait_for_selector(figure(name) + "[data-loaded] canvas", timeout=TIMEOUT_MS)
    # the default choice: a counter's rate (4 per 12 s), not its raw deltas
    assert await page.text_content(figure("jobs_total") + " .title") == "rate(jobs_total)"
    assert float(await page.get_attribute(figure("jobs_total"), "data-last")) == pytest.approx(4 / 12)
    # buckets: p99 from the le bounds (rank 9.9 of 10 inside (0.1, 1]), not an average over them
    assert await page.text_content(figure("rt_seconds_bucket") + " .title") == "p99(rt_seconds_bucket)"
    assert float(await page.get_attribute(figure("rt_seconds_bucket"), "data-last")) == pytest.approx(0.955)
    # the 1 h range starts 50 minutes before the data: the chart says where it begins
    begins = float(await page.get_attribute(figure("jobs_total"), "data-begins"))
    assert begins == pytest.approx(first, abs=12)
    assert "data begins" in await page.text_content(figure("jobs_total") + " .info")
    # p90 from the select: the same buckets give 0.1 + 0.9 * 1/2
    await page.select_option("#metric-agg", "p90")
    await page.wait_for_selector(figure("rt_seconds_bucket") + '[data-loaded] .title:text-is("p90(rt_seconds_bucket)")',
                                 timeout=TIMEOUT_MS)
    await page.wait_for_function(
        """() => Math.abs(Number(document.querySelector('figure[data-name="rt_seconds_bucket"]')?.dataset.last) - 0.55)
        < 1e-9""", timeout=TIMEOUT_MS)
    assert "agg=p90" in page.url
