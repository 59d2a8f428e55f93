-- POST a 64 KiB body (wrk -s bench/wrk_post.lua)
wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
