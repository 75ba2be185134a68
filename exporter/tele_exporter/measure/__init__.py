"""The training thread's side: tensor math, the per-step gradient meter, sharding, heads and seed probes.

Torch only, never prometheus_client: everything here stays on the device and never
waits for it; the telemetry layer gathers what it recorded once per update.
"""
