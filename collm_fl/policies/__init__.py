"""Coordination policies: pure functions of measured inputs, shared by the live system, the tests
and the simulator."""
