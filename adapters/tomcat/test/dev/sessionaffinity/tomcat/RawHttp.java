package dev.sessionaffinity.tomcat;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * A minimal HTTP/1.x client over a socket that also returns trailers (the
 * JDK's clients drop them). One request per connection.
 */
final class RawHttp {

    static final class Reply {
        final int status;
        /** Lower-cased names. */
        final Map<String, String> headers;
        final String body;
        final byte[] bodyBytes;
        final Map<String, String> trailers;

        Reply(int status, Map<String, String> headers, byte[] body, Map<String, String> trailers) {
            this.status = status;
            this.headers = headers;
            this.bodyBytes = body;
            this.body = new String(body, StandardCharsets.UTF_8);
            this.trailers = trailers;
        }

        String header(String name) {
            return headers.get(name);
        }

        @Override
        public String toString() {
            return status + " " + headers + " trailers=" + trailers + " body=" + body;
        }
    }

    private RawHttp() {
    }

    static Reply send(int port, String method, String path, Map<String, String> headers, String version) throws IOException {
        try (Socket socket = new Socket("127.0.0.1", port)) {
            socket.setSoTimeout(10_000);
            StringBuilder request = new StringBuilder(method + " " + path + " " + version + "\r\nHost: localhost\r\n");
            headers.forEach((name, value) -> request.append(name).append(": ").append(value).append("\r\n"));
            request.append("Content-Length: 0\r\nConnection: close\r\n\r\n");
            OutputStream out = socket.getOutputStream();
            out.write(request.toString().getBytes(StandardCharsets.ISO_8859_1));
            out.flush();
            return read(socket.getInputStream());
        }
    }

    private static Reply read(InputStream in) throws IOException {
        String statusLine = line(in);
        int status = Integer.parseInt(statusLine.split(" ")[1]);
        Map<String, String> headers = fields(in);
        ByteArrayOutputStream body = new ByteArrayOutputStream();
        Map<String, String> trailers = new LinkedHashMap<>();
        if ("chunked".equalsIgnoreCase(headers.get("transfer-encoding"))) {
            for (int size; (size = Integer.parseInt(line(in).split(";")[0].trim(), 16)) > 0; ) {
                body.write(in.readNBytes(size));
                line(in);
            }
            trailers = fields(in);
        } else {
            body.write(in.readAllBytes());
        }
        return new Reply(status, headers, body.toByteArray(), trailers);
    }

    private static Map<String, String> fields(InputStream in) throws IOException {
        Map<String, String> fields = new LinkedHashMap<>();
        for (String line; !(line = line(in)).isEmpty(); ) {
            int colon = line.indexOf(':');
            fields.merge(line.substring(0, colon).trim().toLowerCase(), line.substring(colon + 1).trim(), (a, b) -> a + ", " + b);
        }
        return fields;
    }

    private static String line(InputStream in) throws IOException {
        ByteArrayOutputStream line = new ByteArrayOutputStream();
        for (int b; (b = in.read()) != '\n'; ) {
            if (b < 0) {
                throw new IOException("connection closed mid-line: " + line);
            }
            if (b != '\r') {
                line.write(b);
            }
        }
        return line.toString(StandardCharsets.ISO_8859_1);
    }
}
