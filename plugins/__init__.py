"""Built-in plugins. Each module registers through the same hooks a third-party plugin uses."""

# Module names the PluginManager loads as built-ins, in this order.
BUILTIN: tuple[str, ...] = (
    "agent.builtin_plugins.system",
    "agent.builtin_plugins.process",
    "agent.builtin_plugins.statsd",
    "agent.builtin_plugins.prometheus",
    "agent.builtin_plugins.otlp",
    "agent.builtin_plugins.jsonl",
    "agent.builtin_plugins.postgres",
    "agent.builtin_plugins.supabase",
    "agent.builtin_plugins.nats",
    "agent.builtin_plugins.nats_source",
    "agent.builtin_plugins.timeout",
    "agent.builtin_plugins.retry",
    "agent.builtin_plugins.circuit_breaker",
    "agent.builtin_plugins.concurrency",
    "agent.builtin_plugins.store",
)
