"""Runs that survive faults: in-job restarts from the last checkpoint (recovery), preemption by signal
(preemption), deadlines on every phase with stack reports (watchdog, stacks). docs/faults.md."""
