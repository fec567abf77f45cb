"""Routing analysis: which experts tokens choose, by domain and by token.

    stats.py    the figures, pure functions of (labels, expert choices): usage per
                domain, normalized mutual information, consecutive-token expert reuse
                against its chance rate, top tokens per expert, token classes
    collect.py  run a one-process model over each domain's validation tokens, record
                every MoE layer's choices (MoELayer.routing_observer) and per-domain loss
    report.py   heatmaps (matplotlib), the JSON of every figure, a text and HTML report
"""
