"""Programs the commands layer runs on the head through the fleet layer (``RayCluster.run_on_head``).

Real modules shipped by their own source (``python -`` on the head, arguments as
JSON in ``argv[1]``, ``PROGRESS text`` lines and one ``RESULT {json}`` line on
stdout); they may import ``cluster.serving``, which every node has installed
(Serve's controller loads :mod:`cluster.serving.drain` there).
"""
