"""HTTP routers: models, certify, oip (v2 data plane), health; bounds and jobs (job runners)."""
