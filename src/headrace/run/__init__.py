"""``headrace run``: the loop that snapshots, streams, applies and confirms."""
