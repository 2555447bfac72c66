"""The latency histogram's quantiles and the RSS reading."""

from engram_ray.rpc.metrics import BUCKETS_S, LatencyHistogram, rss_bytes


def test_quantiles_are_bucket_upper_edges():
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    for _ in range(98):
        h.record(0.001)  # 1 ms
    h.record(0.5)
    h.record(0.5)
    p50, p99 = h.quantile(0.5), h.quantile(0.99)
    assert 0.001 <= p50 < 0.001 * 1.6 and 0.5 <= p99 < 0.5 * 1.6
    h.record(1e6)  # beyond the last bucket: counted, reported at the last edge
    assert h.quantile(1.0) == BUCKETS_S[-1]


def test_rss_is_plausible():
    assert 10 << 20 < rss_bytes() < 1 << 40
