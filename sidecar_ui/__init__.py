"""The dashboard's static files (HTML, CSS, ES modules), served by the agent."""
