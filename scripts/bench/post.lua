-- wrk: POST a small JSON event on every request (keep-alive).
wrk.method = "POST"
wrk.body = '{"name": "bench"}'
wrk.headers["Content-Type"] = "application/json"
