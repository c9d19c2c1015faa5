"""A trace-driven discrete-event simulator of the faser_sgl server (``python -m faser_sgl.sim``).

The real BatchPlanner (with the real KV slot allocator) and the real speculation policies run
unchanged; only the executor is simulated: a forward pass takes the time a cost profile gives for
its token count, drafts are accepted as a recorded (or synthetic) acceptance trace says, and
early-exit verdicts come from recorded predictor outcomes.  Time is a virtual clock, so a run is
a pure function of its inputs and ``--seed``.  See docs/simulation.md.
"""
