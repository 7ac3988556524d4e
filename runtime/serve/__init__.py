"""edgecore serve: the long-running inspection service on the camera (torch-free; `edgecore[serve]`).

Modules: ``config`` (TOML + flags), ``sources`` (folder, video/V4L2/RTSP, GenICam), ``sinks``
(JSONL, overlays, MQTT, webhook, OPC UA), ``model`` (hot swap), ``service`` (queue, workers,
drain), ``http`` (KServe v2, metrics, live page), ``threshold`` (`edgecore threshold`), ``cli``.
"""
