// Builds the browser's Supabase client from /api/v1/ui-config. supabase-js (≈210 kB) is
// imported only here and only when the data source needs it (supabase or dual).

export const SUPABASE_MODULE = "/ui/vendor/supabase-js/supabase.esm.js";

export function needsSupabase(uiConfig) {
  return uiConfig.data_source === "supabase" || uiConfig.data_source === "dual";
}

// Returns {client, table, schema}, or null when the mode needs none. Throws a message
// the page shows when the mode needs Supabase but the agent has no public settings.
export async function createSupabaseClient(uiConfig, importer = (p) => import(p)) {
  if (!needsSupabase(uiConfig)) return null;
  const sb = uiConfig.supabase;
  if (!sb || !sb.url || !sb.anon_key) {
    throw new Error(`data source is ${uiConfig.data_source} but the agent has no [dashboard] supabase_url and supabase_anon_key`);
  }
  const { createClient } = await importer(SUPABASE_MODULE);
  const client = createClient(sb.url, sb.anon_key, {
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    // Phoenix JSON serializer v1: supported by Supabase Realtime and the test emulator.
    realtime: { vsn: "1.0.0", params: { eventsPerSecond: 1000 } },
  });
  return { client, table: sb.table || "monitoring_events", schema: sb.schema || "public" };
}
