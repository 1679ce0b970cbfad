"""rlmon's benchmarks: overhead side by side with the trackers people use, collector scale,
training overhead, stop latency, memory, scrape and start-up. ``benchmarks/run_all.py`` runs them
all (``rlmon bench`` runs it with ``--quick``); each module also runs on its own."""
