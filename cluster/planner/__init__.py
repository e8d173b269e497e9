"""Profile, simulate, plan: the capacity side of the cluster.

    profile.py    the profile file (JSON): per-step engine costs, KV bandwidth, contention,
                  the hardware/model/vLLM it was taken on; the step-cost model fitted from it
    profiler.py   `disagg-serve profile`: measures a real vLLM engine in a Ray actor
    synthetic.py  profiles synthesized from public per-token costs (no hardware needed)
    sim_engine.py one simulated vLLM engine (scheduler: chunked prefill, token budget, KV blocks)
    simulator.py  the discrete-event cluster simulator, driving the router's real policies
    plan.py       DistServe's placement search and the serve config it writes
    melange.py    Mélange's cheapest GPU mix from a catalog
    capacity.py   the profile's capacity model as the autoscaler sees it

Sits with the entry points: it may use the router's pure policy modules and the bench's
workload generators and metrics math; nothing below imports it.
"""
