"""Demo projects: small SaaS-style apps using ai_saas_middleware, and a local provider."""
