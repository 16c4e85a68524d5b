-- wrk script for benchmarks/bench_http.py --wrk: POST real images to /api/v1/analyze as multipart forms
-- (the page's request, heatmap asked for), cycling through the files given after "--".
local bodies, index = {}, 0
local boundary = "dermscreenbenchboundary"

function init(args)
  for _, path in ipairs(args) do
    local f = assert(io.open(path, "rb"))
    local data = f:read("*a")
    f:close()
    bodies[#bodies + 1] = "--" .. boundary .. "\r\n" ..
      'Content-Disposition: form-data; name="heatmap"\r\n\r\ntrue\r\n' ..
      "--" .. boundary .. "\r\n" ..
      'Content-Disposition: form-data; name="image"; filename="image.jpg"\r\n' ..
      "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  end
end

function request()
  index = index % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, bodies[index])
end
