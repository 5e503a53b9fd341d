"""Running a scenario: the engine and the edge fleet (spawn, probe, timeline)."""
