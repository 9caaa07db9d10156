"""Built-in plugins. Each module registers through the same hooks a third-party plugin uses."""

# Module names the PluginManager loads as built-ins, in this order.
BUILTIN: tuple[str, ...] = (
    "plugins.system",
    "plugins.process",
    "plugins.statsd",
    "plugins.prometheus",
    "plugins.jsonl",
    "plugins.postgres",
    "plugins.supabase",
    "plugins.timeout",
    "plugins.retry",
    "plugins.circuit_breaker",
    "plugins.concurrency",
    "plugins.store",
)
