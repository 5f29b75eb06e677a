"""Flow-level swarm simulator: the real SchedulerEngine and DownloadPlanner over modelled hosts and links.

Modules: clock (virtual time), flows (link capacities shared among flows), upload (a parent's side of a
piece connection), peer (one download: the conductor's and parent set's behaviour), source (origin
streams), scheduler (the engine behind a latency), swarm (a whole run), report (figures), cli (`dfly sim`).
"""
