"""Benchmarks: `disagg-serve bench`, a load generator for a running server, and the comparison
studies of `disagg-serve bench-suite`.

    harness   the `bench` command: its flags, prompts sized against the server, requests on
              schedule, results written out
    workload  arrival times, prompt and output lengths, prompts cut from the stdlib's source
    recorder  one streamed request as the client saw it (StreamRecorder)
    records   the math over those records: latencies, throughput, goodput, requests in flight
    report    results as text tables
    plots     results as PNG figures, and pyplot(): the one way the benchmarks get matplotlib
    studies/  baseline-vs-new comparisons, one module each, registered by name
"""
