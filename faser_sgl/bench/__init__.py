"""Load testing: replay realistic arrivals (Poisson sweeps, bursty MMPP or a recorded trace)
against a running faser_sgl server, one server per setting, and report latency and throughput
per policy as JSON, CSV, plots and a markdown report.  Run it as ``python -m faser_sgl.bench``
or ``scripts/load_test.py``."""
