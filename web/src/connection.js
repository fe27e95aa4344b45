// The Socket.IO link. socket.io-client reconnects by itself with exponential backoff; this
// module reports the state, sends the API key on every attempt and turns acks into promises.
import { io } from "socket.io-client";

/**
 * @param {{token: () => string, onState: (state: string, detail?: string) => void,
 *   onConnect: () => void, onRefused: (message: string) => void,
 *   onAnswer: (event: object) => void, onServerError: (error: object) => void}} handlers
 */
export function connect(handlers) {
  const socket = io({
    path: "/socket.io/",
    // A function, so each attempt sends the key in use now, not the one at page load.
    auth: (send) => {
      const token = handlers.token();
      send(token ? { token } : {});
    },
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
    randomizationFactor: 0.5,
    timeout: 10000,
  });
  handlers.onState("connecting");
  socket.on("connect", () => {
    handlers.onState("connected");
    handlers.onConnect();
  });
  socket.on("disconnect", (reason) => {
    // The server closing us on purpose is the one case the client does not retry alone.
    if (reason === "io server disconnect") socket.connect();
    handlers.onState("reconnecting", reason);
  });
  socket.on("connect_error", (err) => {
    // The server said no (an API key is missing or wrong): socket.io-client has given up,
    // and only reconnect() tries again. Anything else is the network: it retries alone.
    if (!socket.active) handlers.onRefused(err?.message || "the server refused the connection");
    else handlers.onState("reconnecting", err?.message);
  });
  socket.io.on("reconnect_attempt", (n) => handlers.onState("reconnecting", `attempt ${n}`));
  socket.on("answer", (event) => handlers.onAnswer(event));
  socket.on("error", (error) => handlers.onServerError(error));
  return socket;
}

/** Connect again now, with whatever key `token()` gives: after a new key, or a forgotten one. */
export function reconnect(socket) {
  if (socket.active) socket.disconnect();
  socket.connect();
}

/**
 * Emit with an ack; resolves with the ack's payload, rejects on timeout or an {error} ack.
 * @returns {Promise<any>}
 */
export async function request(socket, event, payload, timeoutMs) {
  let reply;
  try {
    reply = await socket.timeout(timeoutMs).emitWithAck(event, payload);
  } catch {
    throw new Error(`No reply from the server to "${event}" within ${Math.round(timeoutMs / 1000)} s.`);
  }
  if (reply && typeof reply === "object" && typeof reply.error === "string") {
    const error = new Error(reply.error);
    error.reply = reply; // a failed no-stream answer still names its id
    throw error;
  }
  return reply;
}
