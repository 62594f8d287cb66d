package dev.sessionaffinity.tomcat;

import java.security.SecureRandom;
import java.util.Base64;
import java.util.regex.Pattern;

import org.apache.catalina.SessionIdGenerator;

/**
 * Session ids in the proxy's format: 22 base64url characters from 16 random
 * bytes. The valve installs this generator on the context's Manager, so an id
 * Tomcat picks itself (changeSessionId() at login) is one the proxy accepts as
 * the session's new id, and a session the app makes on a new session's first
 * request gets the id the proxy chose.
 *
 * <p>Ids never carry a jvmRoute suffix: the proxy does the routing.
 */
public final class SessionIds implements SessionIdGenerator {

    private static final Pattern FORMAT = Pattern.compile("[A-Za-z0-9_-]{22}");
    private static final int BYTES = 16;
    private static final SecureRandom RANDOM = new SecureRandom();
    private static final Base64.Encoder BASE64URL = Base64.getUrlEncoder().withoutPadding();

    /** The proxy's id for a new session, while its first request runs on this thread. */
    private static final ThreadLocal<String> OFFERED = new ThreadLocal<>();

    private volatile String jvmRoute;

    /** The next session made on this thread (by getSession(true)) gets id; once. */
    static void offer(String id) {
        OFFERED.set(id);
    }

    static void withdraw() {
        OFFERED.remove();
    }

    /** True if id has the proxy's session id format. */
    public static boolean isSessionId(String id) {
        return id != null && FORMAT.matcher(id).matches();
    }

    /** A new session id from 16 SecureRandom bytes. */
    public static String newSessionId() {
        return randomToken(BYTES);
    }

    /** base64url (no padding) of count SecureRandom bytes. */
    static String randomToken(int count) {
        byte[] bytes = new byte[count];
        RANDOM.nextBytes(bytes);
        return BASE64URL.encodeToString(bytes);
    }

    @Override
    public String generateSessionId() {
        String offered = OFFERED.get();
        if (offered != null) {
            OFFERED.remove();
            return offered;
        }
        return newSessionId();
    }

    @Override
    public String generateSessionId(String route) {
        return generateSessionId();
    }

    /** Kept because the Manager sets it; ids never include it. */
    @Override
    public String getJvmRoute() {
        return jvmRoute;
    }

    @Override
    public void setJvmRoute(String jvmRoute) {
        this.jvmRoute = jvmRoute;
    }

    @Override
    public int getSessionIdLength() {
        return BYTES;
    }

    /** The length is fixed by the proxy's format; a configured one is ignored. */
    @Override
    public void setSessionIdLength(int sessionIdLength) {
        // fixed at 16 bytes
    }
}
