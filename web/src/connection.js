// The Socket.IO link. socket.io-client reconnects by itself with exponential backoff; this
// module reports the state and turns acks into promises.
import { io } from "socket.io-client";

/**
 * @param {{onState: (state: string, detail?: string) => void, onConnect: () => void,
 *   onAnswer: (event: object) => void, onServerError: (error: object) => void}} handlers
 */
export function connect(handlers) {
  const socket = io({
    path: "/socket.io/",
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
  socket.on("connect_error", (err) => handlers.onState("reconnecting", err?.message));
  socket.io.on("reconnect_attempt", (n) => handlers.onState("reconnecting", `attempt ${n}`));
  socket.on("answer", (event) => handlers.onAnswer(event));
  socket.on("error", (error) => handlers.onServerError(error));
  return socket;
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
