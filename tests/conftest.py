pytest_plugins = ["tests.conftest_supabase"]
