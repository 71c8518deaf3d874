"""Uploads a file to ternd with tuspy, an independent tus client: stops at 90 %, then a new
uploader resumes from the server's offset. Prints one JSON line with what happened.

usage: tus_upload.py BASE_URL TOKEN FILE MEDIA_ID
"""
import json
import sys

from tusclient import client

base, token, path, media_id = sys.argv[1:5]
size = __import__("os").path.getsize(path)
tus = client.TusClient(base + "/v1/uploads", headers={"Authorization": "Bearer " + token})

first = tus.uploader(
    path,
    chunk_size=64 * 1024,
    metadata={"filename": "photo.jpg", "sha256": media_id},
    upload_checksum=True,
)
stop = size * 9 // 10
first.upload(stop_at=stop)
stopped_at = first.offset

# A new uploader for the same URL asks the server where to go on (HEAD), as after a crash.
second = tus.uploader(path, url=first.url, chunk_size=64 * 1024, upload_checksum=True)
resumed_from = second.offset
second.upload()
print(json.dumps({
    "url": first.url,
    "stopped_at": stopped_at,
    "resumed_from": resumed_from,
    "final_offset": second.offset,
    "size": size,
}))
