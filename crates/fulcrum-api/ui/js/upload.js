// A package upload through the resumable upload API (/api/image-upload): chunks are sent one at
// a time and each is acknowledged only once on disk, so a dropped connection (or a closed tab,
// when the same file is chosen again) continues from the acknowledged offset instead of from 0.

import { ApiError, get, headersFor, messageOf, post } from './api.js';
import { Sha256 } from './sha256.js';

export const CHUNK_BYTES = 8 << 20;
const RETRIES = 8;

const sessionKey = (file) => `fulcrum-upload:${file.name}:${file.size}:${file.lastModified}`;
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

async function readSlice(file, start, end) {
  return new Uint8Array(await file.slice(start, end).arrayBuffer());
}

/** PUT one chunk; `onSent(bytes)` follows its bytes as they leave. */
function putChunk(id, bytes, start, size, onSent) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('PUT', `/api/image-upload/${encodeURIComponent(id)}`);
    for (const [name, value] of Object.entries(headersFor('PUT'))) xhr.setRequestHeader(name, value);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.setRequestHeader('Content-Range', `bytes ${start}-${start + bytes.length - 1}/${size}`);
    xhr.upload.onprogress = (event) => onSent(event.loaded);
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { data = xhr.responseText; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, messageOf(xhr.status, data, xhr.statusText), data));
    };
    xhr.onerror = () => reject(new ApiError(0, 'the connection dropped'));
    xhr.onabort = () => reject(new ApiError(0, 'the upload was stopped'));
    xhr.send(bytes);
  });
}

/**
 * Uploads `file`; `report({sent, size, note})` is called as bytes are acknowledged (and with a
 * note when the upload resumes after an error). Resolves with the image record.
 */
export async function uploadPackage(file, report) {
  const key = sessionKey(file);
  let session = null;
  const saved = localStorage.getItem(key);
  if (saved) {
    try { session = await get(`/api/image-upload/${encodeURIComponent(saved)}`); } catch { session = null; }
  }
  if (!session) {
    session = await post('/api/image-upload', { size: file.size, filename: file.name });
    localStorage.setItem(key, session.uuid);
  } else {
    report({ sent: session.offset, size: file.size, note: `Resuming at ${session.offset} of ${file.size} bytes.` });
  }
  let hasher = new Sha256();
  let hashed = 0;
  // The digest covers every byte; bytes the controller already has are hashed from the file.
  const hashUpTo = async (offset) => {
    if (offset < hashed) { hasher = new Sha256(); hashed = 0; }
    while (hashed < offset) {
      const end = Math.min(offset, hashed + CHUNK_BYTES);
      hasher.update(await readSlice(file, hashed, end));
      hashed = end;
    }
  };
  let offset = session.offset;
  await hashUpTo(offset);
  let failures = 0;
  while (offset < file.size) {
    const end = Math.min(file.size, offset + CHUNK_BYTES);
    const bytes = await readSlice(file, offset, end);
    try {
      const answer = await putChunk(session.uuid, bytes, offset, file.size,
        (sent) => report({ sent: offset + Math.min(sent, bytes.length - 1), size: file.size }));
      if (answer.offset !== end) throw new ApiError(500, `the controller acknowledged ${answer.offset}, not ${end}`);
      hasher.update(bytes);
      hashed = end;
      offset = end;
      failures = 0;
      report({ sent: offset, size: file.size });
    } catch (error) {
      // Refusals other than "not where I am" (409) are final; a dropped connection is retried.
      const retriable = error.status === 0 || error.status === 409 || error.status >= 500;
      failures += 1;
      if (!retriable || failures > RETRIES) {
        if (error.status === 404) localStorage.removeItem(key);
        throw error;
      }
      await sleep(Math.min(5000, 300 * 2 ** (failures - 1)));
      const state = await get(`/api/image-upload/${encodeURIComponent(session.uuid)}`);
      offset = state.offset;
      await hashUpTo(offset);
      report({ sent: offset, size: file.size, note: `Connection lost (${error.message}); resumed at ${offset} bytes.` });
    }
  }
  report({ sent: file.size, size: file.size, note: 'Verifying the package…' });
  const image = await post(`/api/image-upload/${encodeURIComponent(session.uuid)}/complete`, { sha256: hasher.hex() });
  localStorage.removeItem(key);
  return image;
}
