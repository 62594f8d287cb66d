package dev.sessionaffinity.tomcat;

import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Arrays;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Supplier;
import java.util.regex.Pattern;
import java.util.regex.PatternSyntaxException;
import java.util.stream.Collectors;

import jakarta.servlet.ServletException;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletRequestWrapper;
import jakarta.servlet.http.HttpSession;

import javax.management.JMException;
import javax.management.MBeanServer;
import javax.management.ObjectName;

import org.apache.catalina.Context;
import org.apache.catalina.Engine;
import org.apache.catalina.Host;
import org.apache.catalina.Lifecycle;
import org.apache.catalina.LifecycleEvent;
import org.apache.catalina.LifecycleException;
import org.apache.catalina.LifecycleListener;
import org.apache.catalina.Manager;
import org.apache.catalina.Service;
import org.apache.catalina.Session;
import org.apache.catalina.connector.Connector;
import org.apache.catalina.connector.Request;
import org.apache.catalina.connector.Response;
import org.apache.catalina.session.StandardSession;
import org.apache.catalina.valves.ValveBase;
import org.apache.coyote.ProtocolHandler;
import org.apache.coyote.http11.AbstractHttp11Protocol;
import org.apache.juli.logging.Log;
import org.apache.juli.logging.LogFactory;
import org.apache.tomcat.util.http.MimeHeaders;

/**
 * Speaks the session-affinity proxy's app contract for an unmodified web app,
 * so its in-memory HttpSessions survive the loss of the pod.
 *
 * <p>Install: the jar in {@code $CATALINA_BASE/lib}, and in the app's
 * {@code context.xml}: {@code <Valve className="dev.sessionaffinity.tomcat.SessionAffinityValve"/>}.
 *
 * <p>The Tomcat session id is the proxy's session id (x-session-id), so the
 * app's own session cookie, if Tomcat sets one, carries the same value.
 * Requests without x-session-id are served exactly like plain Tomcat.
 *
 * <p>Per request of a session: create it (x-session-new), recreate it from a
 * signed state (x-session-state), or answer "unknown" without running the
 * app. After the app: send the state if the serialized attributes changed,
 * x-session-end if the app invalidated the session, x-session-rotate if it
 * changed the session id. A response committed before the app finished
 * carries the state in a trailer when it can, otherwise the session's next
 * response does.
 */
public final class SessionAffinityValve extends ValveBase {

    private static final Log log = LogFactory.getLog(SessionAffinityValve.class);
    /** Session note: what the proxy's store holds for the session, as far as this valve sent it. */
    private static final String SENT_NOTE = SessionAffinityValve.class.getName() + ".sent";
    /** Session note: a hash of the state the session was restored from. */
    private static final String RESTORED_NOTE = SessionAffinityValve.class.getName() + ".restoredFrom";
    private static final String OVERLAP_NOTE = SessionAffinityValve.class.getName() + ".overlap";
    private static final int MIN_STATE_BYTES = 512;
    /** Envoy's response flags in the stopping answer: the app was not reached (UF), or may have been (UC). */
    private static final String UNREACHED_BEFORE_THE_APP = "UF";
    private static final String UNREACHED_AFTER_THE_APP = "UC";
    /** Room left for the status line and framing when checking that a state fits the response headers. */
    private static final int HEADER_SLACK = 512;
    private static final int DEFAULT_MAX_RESPONSE_HEADER = 8192;
    /** Room a restore request needs besides the state: the client's own headers (cookies) and the proxy's. */
    private static final int REQUEST_HEADER_ROOM = 4096;
    /** Attribute names warned about at most, so a stream of new names cannot grow the set without bound. */
    private static final int MAX_WARNED = 1000;
    private static final MessageDigest SHA256 = sha256();
    /** Set by DefaultServlet when the body goes out through sendfile (Globals.SENDFILE_FILENAME_ATTR). */
    private static final String SENDFILE_FILENAME = "org.apache.tomcat.sendfile.filename";

    // Configuration: attributes of the <Valve> element.
    private String keyFile = "";
    private String keyEnvironment = "SESSION_STATE_KEYS";
    private String allowedClasses = "";
    private int maxStateBytes = 4096;
    private int bufferSize = 64 * 1024;
    private boolean trailers = true;
    private int refreshSeconds = 60;
    private int maxStateAgeSeconds = 0;
    private String appId = "";
    /** RemoteIpValve's convention: loopback and private addresses (a sidecar, a pod network). */
    private String internalProxies = "127\\.\\d{1,3}\\.\\d{1,3}\\.\\d{1,3}|0:0:0:0:0:0:0:1|::1"
            + "|10\\.\\d{1,3}\\.\\d{1,3}\\.\\d{1,3}|192\\.168\\.\\d{1,3}\\.\\d{1,3}|169\\.254\\.\\d{1,3}\\.\\d{1,3}"
            + "|172\\.(?:1[6-9]|2\\d|3[01])\\.\\d{1,3}\\.\\d{1,3}|100\\.(?:6[4-9]|[7-9]\\d|1[01]\\d|12[0-7])\\.\\d{1,3}\\.\\d{1,3}"
            + "|f[cd][0-9a-f]{2}:.*|fe[89ab][0-9a-f]:.*";
    private String sessionIdHeader = "x-session-id";
    private String sessionNewHeader = "x-session-new";
    private String sessionStateHeader = "x-session-state";
    private String sessionUnknownHeader = "x-session-unknown";
    private String sessionEndHeader = "x-session-end";
    private String sessionRotateHeader = "x-session-rotate";
    private String instanceIdHeader = "x-instance-id";
    private String sessionUnreachedHeader = "x-session-unreached";

    // Set up by startInternal().
    private final Counters counters = new Counters();
    private final Set<String> warnedAttributes = ConcurrentHashMap.newKeySet();
    private final AtomicBoolean warnedNoRoom = new AtomicBoolean();
    private final LifecycleListener contextListener = this::onContextEvent;
    /**
     * The context is stopping: its Manager expires every session, so a
     * session that disappears now was not ended by the app, and must not be
     * announced as ended (the proxy would tombstone it).
     */
    private volatile boolean stopping;
    /** Striped locks: one restore of a session id at a time. */
    private final Object[] restoreLocks = new Object[64];
    private volatile String instanceId;
    private volatile StateCodec codec;
    private volatile Pattern allowList;
    private volatile String contextPath;
    /** What a state is bound to: host name, context path and app id. */
    private volatile String binding;
    private volatile Pattern trustedSenders;
    private final AtomicBoolean warnedUntrusted = new AtomicBoolean();
    private volatile byte[] emptyAttributes;
    private volatile ObjectName countersName;

    public SessionAffinityValve() {
        super(true);
        Arrays.setAll(restoreLocks, i -> new Object());
    }

    // ------------------------------------------------------------ lifecycle

    @Override
    protected void startInternal() throws LifecycleException {
        if (!(getContainer() instanceof Context)) {
            throw new LifecycleException("SessionAffinityValve belongs in a Context (context.xml), not in "
                    + getContainer());
        }
        if (maxStateBytes < MIN_STATE_BYTES) {
            throw new LifecycleException("SessionAffinityValve maxStateBytes: " + maxStateBytes
                    + " is too small; use at least " + MIN_STATE_BYTES);
        }
        if (refreshSeconds < 1 || bufferSize < 0) {
            throw new LifecycleException("SessionAffinityValve: refreshSeconds must be at least 1 and bufferSize at least 0");
        }
        if (maxStateAgeSeconds != 0 && maxStateAgeSeconds <= refreshSeconds) {
            throw new LifecycleException("SessionAffinityValve maxStateAgeSeconds: " + maxStateAgeSeconds
                    + " must be 0 (off) or more than refreshSeconds (" + refreshSeconds + "), or sessions in use could not move");
        }
        try {
            trustedSenders = Pattern.compile(internalProxies);
        } catch (PatternSyntaxException e) {
            throw new LifecycleException("SessionAffinityValve internalProxies: " + e.getMessage());
        }
        try {
            codec = new StateCodec(StateKeys.load(keyFile, keyEnvironment, System.getenv()));
            allowList = Attributes.allowList(allowedClasses);
        } catch (IllegalArgumentException e) {
            String field = e instanceof PatternSyntaxException ? "allowedClasses: " : "";
            throw new LifecycleException("SessionAffinityValve " + field + e.getMessage());
        }
        emptyAttributes = Attributes.none();
        contextPath = ((Context) getContainer()).getPath();
        // A state is signed for one virtual host, web app and app id: it restores nowhere else.
        binding = getContainer().getParent().getName() + contextPath + (appId.isEmpty() ? "" : "#" + appId);
        instanceId = SessionIds.randomToken(12);
        countersName = registerCounters();
        getContainer().addLifecycleListener(contextListener);
        checkConnectors();
        String version = SessionAffinityValve.class.getPackage().getImplementationVersion();
        log.info("SessionAffinityValve " + (version == null ? "(unpackaged)" : version) + " for '" + contextPath
                + "': instance id " + instanceId + ", maxStateBytes "
                + maxStateBytes + ", trailers " + (trailers ? "on" : "off") + ", counters " + countersName);
        super.startInternal();
    }

    /**
     * Warns at start about connectors whose header limits are too small for
     * maxStateBytes: a restore request over the request limit gets a 400
     * before any valve runs, and a state over the response limit goes in a trailer.
     */
    private void checkConnectors() {
        if (!(getContainer().getParent() instanceof Host) || !(getContainer().getParent().getParent() instanceof Engine)) {
            return;
        }
        Service service = ((Engine) getContainer().getParent().getParent()).getService();
        for (Connector connector : service == null ? new Connector[0] : service.findConnectors()) {
            if (!(connector.getProtocolHandler() instanceof AbstractHttp11Protocol)) {
                continue;
            }
            AbstractHttp11Protocol<?> http = (AbstractHttp11Protocol<?>) connector.getProtocolHandler();
            int request = maxStateBytes + REQUEST_HEADER_ROOM;
            if (http.getMaxHttpRequestHeaderSize() < request) {
                log.warn("SessionAffinityValve: connector on port " + connector.getPort() + " has maxHttpRequestHeaderSize "
                        + http.getMaxHttpRequestHeaderSize() + ", too small for restore requests with maxStateBytes "
                        + maxStateBytes + " (Tomcat answers 400 before the valve runs); set maxHttpRequestHeaderSize=\""
                        + request + "\" or more on that connector");
            }
            if (http.getMaxHttpResponseHeaderSize() < maxStateBytes + HEADER_SLACK) {
                log.warn("SessionAffinityValve: connector on port " + connector.getPort() + " has maxHttpResponseHeaderSize "
                        + http.getMaxHttpResponseHeaderSize() + ", so states near maxStateBytes " + maxStateBytes
                        + " go in trailers; set maxHttpResponseHeaderSize=\"" + (maxStateBytes + 4096) + "\" or more");
            }
        }
    }

    @Override
    protected void stopInternal() throws LifecycleException {
        getContainer().removeLifecycleListener(contextListener);
        super.stopInternal();
        if (countersName != null) {
            try {
                mbeanServer().unregisterMBean(countersName);
            } catch (JMException e) {
                log.debug("counters MBean already gone", e);
            }
            countersName = null;
        }
    }

    private ObjectName registerCounters() {
        try {
            ObjectName valve = getObjectName();
            String where = valve == null ? "context=" + ObjectName.quote(contextPath)
                    : "host=" + valve.getKeyProperty("host") + ",context=" + valve.getKeyProperty("context");
            ObjectName name = new ObjectName(getDomain() + ":type=SessionAffinity," + where);
            mbeanServer().registerMBean(counters, name);
            return name;
        } catch (JMException e) {
            log.warn("SessionAffinityValve: counters are not registered in JMX (" + e + ")");
            return null;
        }
    }

    /** The JVM's MBean server, which Tomcat's registry uses too (and which Spring Boot's disabled registry does not hide). */
    private static MBeanServer mbeanServer() {
        return ManagementFactory.getPlatformMBeanServer();
    }

    // --------------------------------------------------------------- request

    @Override
    public void invoke(Request request, Response response) throws IOException, ServletException {
        response.setHeader(instanceIdHeader, instanceId);
        String sid = request.getHeader(sessionIdHeader);
        if (sid == null && request.getHeader(sessionStateHeader) == null && request.getHeader(sessionNewHeader) == null) {
            getNext().invoke(request, response);
            return;
        }
        if (!trustedSenders.matcher(request.getRemoteAddr()).matches()) {
            // Only the proxy speaks the contract: anyone else could pick a session id or replay a state.
            counters.add(Counter.UNTRUSTED_SENDERS);
            if (warnedUntrusted.compareAndSet(false, true)) {
                log.warn("SessionAffinityValve: ignored the session headers of a request from " + request.getRemoteAddr()
                        + ", which internalProxies does not match (warned once)");
            }
            plain(request, response);
            return;
        }
        if (!SessionIds.isSessionId(sid)) {
            counters.add(Counter.INVALID_SESSION_IDS);
            plain(request, response);
            return;
        }
        if (stopping) {
            answerStopping(response, UNREACHED_BEFORE_THE_APP);
            return;
        }
        Manager manager = request.getContext().getManager();
        Exchange exchange = resolve(request, response, sid, manager);
        if (exchange == null) {
            return; // answered "unknown session"
        }
        request.setRequestedSessionId(sid);
        request.setRequestedSessionCookie(true);
        request.setRequestedSessionURL(false);
        if (bufferSize > response.getBufferSize()) {
            // Most pages then stay uncommitted until the app returns, so the state goes in a header.
            response.setBufferSize(bufferSize);
        }
        if (trailers) {
            try {
                response.setTrailerFields(exchange);
            } catch (IllegalStateException e) {
                // HTTP/1.0: no trailers; a change on a committed response waits for the next one.
            }
        }
        if (exchange.session == null) {
            SessionIds.offer(sid); // a session the app makes on this thread gets the proxy's id
        }
        try {
            getNext().invoke(request, response);
        } finally {
            SessionIds.withdraw();
            if (exchange.overlap != null) {
                exchange.overlap.end();
            }
        }
        if (request.isAsync()) {
            // The app goes on in another thread: the trailer reads the session when the response ends.
            exchange.atEnd = true;
            return;
        }
        finish(exchange, response);
    }

    /** Serves the request like plain Tomcat, without the contract headers. */
    private void plain(Request request, Response response) throws IOException, ServletException {
        MimeHeaders headers = request.getCoyoteRequest().getMimeHeaders();
        headers.removeHeader(sessionIdHeader);
        headers.removeHeader(sessionNewHeader);
        headers.removeHeader(sessionStateHeader);
        getNext().invoke(request, response);
    }

    /**
     * Once the context, and so its Manager, has started, ids that Tomcat
     * itself picks (changeSessionId at login, a new session) must be in the
     * proxy's format. Before it stops, the valve notes that sessions are
     * about to vanish through no act of the app.
     */
    private void onContextEvent(LifecycleEvent event) {
        if (Lifecycle.BEFORE_STOP_EVENT.equals(event.getType())) {
            stopping = true;
        } else if (Lifecycle.AFTER_START_EVENT.equals(event.getType())) {
            stopping = false;
            Manager manager = ((Context) event.getLifecycle()).getManager();
            if (manager != null && !(manager.getSessionIdGenerator() instanceof SessionIds)) {
                manager.setSessionIdGenerator(new SessionIds());
            }
        }
    }

    /**
     * The exchange for the session this request belongs to: found or
     * restored, or none yet for a new session (made only if the app asks for
     * it). Null when the request was answered "unknown session" instead.
     */
    private Exchange resolve(Request request, Response response, String sid, Manager manager) throws IOException {
        Session local = manager.findSession(sid);
        String state = request.getHeader(sessionStateHeader);
        if (state != null) {
            // The app has no use for it, and it should not reach logs that dump headers.
            request.getCoyoteRequest().getMimeHeaders().removeHeader(sessionStateHeader);
            try {
                byte[] from = hash(0, state.getBytes(StandardCharsets.US_ASCII));
                // One restore per session at a time: concurrent requests carrying the same state share one session.
                synchronized (restoreLocks[Math.floorMod(sid.hashCode(), restoreLocks.length)]) {
                    Session current = manager.findSession(sid);
                    if (current != null && current.isValid() && Arrays.equals((byte[]) current.getNote(RESTORED_NOTE), from)) {
                        return exchange(request, sid, current, true);
                    }
                    return exchange(request, sid, restore(request, manager, sid, state, current, from), true);
                }
            } catch (RestoreRefused refused) {
                counters.add(refused.reason.counter);
                log.warn("SessionAffinityValve: refused the restore state for session " + sid.substring(0, 4)
                        + "... from " + request.getRemoteAddr() + ": " + refused.reason + " (" + refused.getMessage() + ")");
                answerUnknown(response, refused.reason == RestoreRefused.Reason.EXPIRED);
                return null;
            }
        }
        if (local != null && local.isValid()) {
            return exchange(request, sid, local, false);
        }
        if ("1".equals(request.getHeader(sessionNewHeader))) {
            // Lazily: a client that never gets a session (a probe, a bot) costs no session and no events.
            return new Exchange(request, sid, null, false);
        }
        counters.add(Counter.SESSIONS_UNKNOWN);
        // A session found but invalid just expired for inactivity: say it ended.
        answerUnknown(response, local != null);
        return null;
    }

    /** An exchange of an existing session, noting whether other requests of it overlap this one. */
    private Exchange exchange(Request request, String sid, Session session, boolean restored) {
        Exchange exchange = new Exchange(request, sid, session, restored);
        exchange.overlap = Overlap.of(session);
        exchange.resend = exchange.overlap.begin();
        return exchange;
    }

    private Session restore(Request request, Manager manager, String sid, String value, Session local, byte[] from)
            throws RestoreRefused {
        long now = System.currentTimeMillis();
        SessionState state = codec.decode(value, sid, binding, now);
        if (maxStateAgeSeconds > 0 && now - state.lastAccessedTime > maxStateAgeSeconds * 1000L) {
            // The last access time is when the state was issued: the valve writes a fresh one each time.
            throw new RestoreRefused(RestoreRefused.Reason.EXPIRED, "issued " + (now - state.lastAccessedTime) / 1000
                    + " s ago, over maxStateAgeSeconds " + maxStateAgeSeconds);
        }
        Attributes.Read read = Attributes.read(state.attributes, request.getContext().getLoader().getClassLoader(), allowList);
        Map<String, Object> attributes = read.values;
        if (!read.refused.isEmpty()) {
            counters.add(Counter.ATTRIBUTES_NOT_RESTORED, read.refused.size());
            read.refused.forEach((name, why) -> warnOnce(name, "session attribute '" + name
                    + "' is not restored (the rest of the session is): " + why));
        }
        Session created = manager.createEmptySession();
        if (!(created instanceof StandardSession)) {
            throw new IllegalStateException("SessionAffinityValve needs a Manager whose sessions are StandardSession"
                    + " (the default StandardManager); found " + created.getClass().getName());
        }
        StandardSession session = (StandardSession) created;
        session.setValid(true);
        session.setNew(false);
        session.setCreationTime(state.creationTime); // also sets the access times, to the creation time
        session.access(); // so the access times are now: Tomcat would otherwise expire an old session at once
        session.endAccess();
        session.setMaxInactiveInterval(state.maxInactiveInterval);
        // Like Tomcat loading persisted sessions: no attribute or creation events, then sessionDidActivate.
        Object login = attributes.remove(Login.ATTRIBUTE);
        if (login instanceof Login) {
            ((Login) login).restoreInto(session); // the container login, as Tomcat cached it
        }
        attributes.forEach((name, attribute) -> session.setAttribute(name, attribute, false));
        session.setNote(SENT_NOTE, new SentNote(hash(state.maxInactiveInterval, state.attributes), state.lastAccessedTime,
                !attributes.isEmpty(), false));
        session.setNote(RESTORED_NOTE, from);
        if (local != null) {
            // A stale copy from before the session moved away: ended like any expiry
            // (sessionDestroyed, valueUnbound), before the restored copy takes its id.
            local.expire();
        }
        session.setId(sid, false);
        session.activate();
        counters.add(Counter.SESSIONS_RESTORED);
        return session;
    }

    private void answerUnknown(Response response, boolean ended) throws IOException {
        if (stopping) {
            // The Manager is expiring every session: not known here now says nothing about the session.
            answerStopping(response, UNREACHED_BEFORE_THE_APP);
            return;
        }
        response.setStatus(409);
        response.setHeader(sessionUnknownHeader, "1");
        if (ended) {
            response.setHeader(sessionEndHeader, "1");
        }
        response.setHeader("Cache-Control", "no-store");
        response.setContentType("text/plain;charset=UTF-8");
        response.getWriter().write("This session is not known here.\n");
    }

    /**
     * The context is stopping: answer as a proxy does for an app it could not
     * reach (503, the contract's "unreached" header with Envoy's response flag,
     * no instance id), so the filter moves the session with its stored state.
     * UF: the app never ran, any method may be replayed; UC: it may have run.
     */
    private void answerStopping(Response response, String flag) throws IOException {
        counters.add(Counter.STOPPING_ANSWERS);
        response.reset();
        response.setStatus(503);
        response.setHeader(sessionUnreachedHeader, flag);
        response.setHeader("Connection", "close");
        response.setHeader("Cache-Control", "no-store");
        response.setContentType("text/plain;charset=UTF-8");
        response.getWriter().write("This server is stopping.\n");
    }

    // ---------------------------------------------------------- after the app

    /** Announces what the request changed: in headers if possible, else in the trailer, else later. */
    private void finish(Exchange exchange, Response response) throws IOException {
        Announcement announcement = announce(exchange);
        if (expiredByStop(exchange, announcement)) {
            if (!response.isCommitted()) {
                answerStopping(response, UNREACHED_AFTER_THE_APP);
            }
            return;
        }
        boolean trailerIsOurs = response.getTrailerFields() == exchange;
        if (!response.isCommitted()) {
            response.setHeader(instanceIdHeader, instanceId); // again, in case the app reset the response
            if (announcement.state == null || fitsInHeaders(exchange.request, response, announcement.state)) {
                if (trailerIsOurs) {
                    response.setTrailerFields(null); // keeps Content-Length framing
                }
                announcement.headers().forEach(response::setHeader);
                announcement.sent(false);
                return;
            }
            if (warnedNoRoom.compareAndSet(false, true)) {
                log.warn("SessionAffinityValve: the response headers have no room for a " + announcement.state.length()
                        + "-byte state, so it goes in a trailer; raise the connector's maxHttpResponseHeaderSize"
                        + " (warned once)");
            }
            if (announcement.rotatedTo != null) {
                // A new id needs a new cookie, which only headers can set: announce it now with the
                // attribute-less state; the full state follows in the trailer or the next response.
                Announcement rotation = withoutAttributes(announcement);
                rotation.headers().forEach(response::setHeader);
                rotation.sent(false);
                announcement = new Announcement(announcement.sessionId, announcement.session, announcement.state,
                        false, null, announcement.note);
            }
        }
        // Tomcat writes a sendfile body raw, after the valve: no chunk framing, so no trailer can follow it.
        boolean sendfile = exchange.request.getAttribute(SENDFILE_FILENAME) != null;
        if (trailerIsOurs && announcement.trailerCanCarry() && !sendfile) {
            exchange.trailer = announcement;
            return;
        }
        if (trailerIsOurs && !response.isCommitted()) {
            response.setTrailerFields(null); // keeps Content-Length (and sendfile) framing
        }
        if (!announcement.isEmpty()) {
            counters.add(Counter.CHANGES_DEFERRED);
        }
    }

    /** The Manager of the stopping context expired the request's session: it was not ended, only this server is. */
    private boolean expiredByStop(Exchange exchange, Announcement announcement) {
        return stopping && announcement.ended && exchange.session != null;
    }

    /** The rotation, with the session's metadata and no attributes (what fits in any header). */
    private Announcement withoutAttributes(Announcement announcement) {
        Session session = announcement.session;
        int maxInactive = session.getMaxInactiveInterval();
        long now = System.currentTimeMillis();
        String value = codec.encode(new SessionState(announcement.sessionId, binding, session.getCreationTimeInternal(),
                now, maxInactive, emptyAttributes));
        return new Announcement(announcement.sessionId, session, value, false, announcement.rotatedTo,
                new SentNote(hash(maxInactive, emptyAttributes), now, false, false));
    }

    /** What this request's session change is, once the app is done with it. */
    private Announcement announce(Exchange exchange) {
        Request request = exchange.request;
        Session session = exchange.session != null && exchange.session.isValid() ? exchange.session
                : request.getSessionInternal(false);
        if (session == null) {
            // Ended by the app, or a new session the app never asked for: nothing to keep either way.
            return new Announcement(exchange.sid, exchange.session, null, true, null, null);
        }
        if (exchange.session == null && exchange.created.compareAndSet(false, true)) {
            counters.add(Counter.SESSIONS_CREATED);
        }
        String id = session.getIdInternal();
        if (!id.equals(exchange.sid) && !SessionIds.isSessionId(id)) {
            // Renamed by something other than our generator: rename again into the proxy's format.
            request.getContext().getManager().changeSessionId(session, SessionIds.newSessionId());
            id = session.getIdInternal();
        }
        String rotatedTo = id.equals(exchange.sid) ? null : id;
        SentNote sent = (SentNote) session.getNote(SENT_NOTE);
        if (rotatedTo == null && sent != null && !exchange.resend && exchange.untouched(session)) {
            // The app never asked for the session, so it cannot have changed it: no serialization at all.
            counters.add(Counter.REQUESTS_UNTOUCHED);
            return new Announcement(id, session, null, false, null, null);
        }
        return stateOf(session, id, sent, rotatedTo != null || sent == null || exchange.resend, rotatedTo);
    }

    private Announcement stateOf(Session session, String id, SentNote sent, boolean mustSend, String rotatedTo) {
        HttpSession http = session.getSession();
        Attributes.Written written;
        int maxInactive;
        try {
            Login login = Login.of(session);
            written = Attributes.write(http, session.getManager(), allowList,
                    login == null ? Map.of() : Map.of(Login.ATTRIBUTE, login));
            maxInactive = http.getMaxInactiveInterval();
        } catch (IOException | RuntimeException e) {
            counters.add(Counter.SERIALIZATION_FAILURES);
            log.warn("SessionAffinityValve: session state not sent, serializing its attributes failed: " + e);
            return new Announcement(id, session, null, false, rotatedTo, null);
        }
        reportSkipped(written);
        byte[] hash = hash(maxInactive, written.bytes);
        long now = System.currentTimeMillis();
        boolean changed = sent == null || !Arrays.equals(sent.hash, hash);
        boolean refreshDue = sent != null && sent.holdsAttributes && now - sent.sentAt >= refreshSeconds * 1000L;
        if (!mustSend && !changed && !refreshDue) {
            return new Announcement(id, session, null, false, rotatedTo, null);
        }
        long created = session.getCreationTimeInternal();
        String value = written.bytes.length > StateCodec.MAX_ATTRIBUTE_BYTES ? null
                : codec.encode(new SessionState(id, binding, created, now, maxInactive, written.bytes));
        boolean oversized = value == null || value.length() > maxStateBytes;
        if (oversized) {
            counters.add(Counter.STATES_OVERSIZED);
            if (sent == null || !sent.oversized) {
                warnOversized(written, value == null ? written.bytes.length : value.length());
            }
            value = codec.encode(new SessionState(id, binding, created, now, maxInactive, emptyAttributes));
        }
        boolean holdsAttributes = !oversized && !Arrays.equals(written.bytes, emptyAttributes);
        return new Announcement(id, session, value, false, rotatedTo, new SentNote(hash, now, holdsAttributes, oversized));
    }

    private void reportSkipped(Attributes.Written written) {
        if (written.skipped.isEmpty()) {
            return;
        }
        counters.add(Counter.ATTRIBUTES_SKIPPED, written.skipped.size());
        written.skipped.forEach((name, why) -> warnOnce(name, "session attribute '" + name
                + "' is not carried to another pod (the rest of the session is): " + why));
    }

    /** Logs a warning about an attribute once per attribute name, for the first MAX_WARNED names. */
    private void warnOnce(String name, String message) {
        if (warnedAttributes.size() < MAX_WARNED && warnedAttributes.add(name)) {
            log.warn("SessionAffinityValve: " + message + " (warned once per attribute name)");
        }
    }

    private void warnOversized(Attributes.Written written, int size) {
        String largest = written.sizes.entrySet().stream()
                .sorted(Map.Entry.<String, Integer>comparingByValue(Comparator.reverseOrder())).limit(3)
                .map(e -> e.getKey() + "=" + e.getValue() + " B").collect(Collectors.joining(", "));
        log.warn("SessionAffinityValve: a session state of " + size + " bytes is over maxStateBytes=" + maxStateBytes
                + "; the proxy stores it without attributes, so a failover starts this session empty."
                + " Largest attributes (serialized): " + largest);
    }

    /** True if value fits in the response headers under the connector's limit (Tomcat answers 500 otherwise). */
    private boolean fitsInHeaders(Request request, Response response, String value) {
        ProtocolHandler protocol = request.getConnector().getProtocolHandler();
        int limit = protocol instanceof AbstractHttp11Protocol
                ? ((AbstractHttp11Protocol<?>) protocol).getMaxHttpResponseHeaderSize() : DEFAULT_MAX_RESPONSE_HEADER;
        MimeHeaders headers = response.getCoyoteResponse().getMimeHeaders();
        int size = HEADER_SLACK + sessionStateHeader.length() + value.length();
        for (int i = 0; i < headers.size(); i++) {
            size += headers.getName(i).getLength() + headers.getValue(i).getLength() + 4;
        }
        return size <= limit;
    }

    private static byte[] hash(int maxInactiveInterval, byte[] attributes) {
        MessageDigest digest;
        try {
            digest = (MessageDigest) SHA256.clone(); // cheaper than a provider lookup on every request
        } catch (CloneNotSupportedException e) {
            throw new IllegalStateException("SHA-256 provider does not support clone()", e);
        }
        digest.update(ByteBuffer.allocate(4).putInt(0, maxInactiveInterval));
        return digest.digest(attributes);
    }

    private static MessageDigest sha256() {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("SHA-256 is not available", e);
        }
    }

    /**
     * A session's requests in flight. When two overlap, the proxy may store
     * their snapshots in either order, so the session's next request sends
     * its state even if unchanged.
     */
    private static final class Overlap {
        private final AtomicInteger active = new AtomicInteger();
        private final AtomicBoolean overlapped = new AtomicBoolean();

        static Overlap of(Session session) {
            synchronized (session) {
                Overlap overlap = (Overlap) session.getNote(OVERLAP_NOTE);
                if (overlap == null) {
                    overlap = new Overlap();
                    session.setNote(OVERLAP_NOTE, overlap);
                }
                return overlap;
            }
        }

        /** True if this request runs alone after an overlap: it resends. */
        boolean begin() {
            if (active.incrementAndGet() > 1) {
                overlapped.set(true);
                return false;
            }
            return overlapped.getAndSet(false);
        }

        void end() {
            active.decrementAndGet();
        }
    }

    /** What the proxy's store holds for a session, as far as this valve knows. */
    private static final class SentNote {
        final byte[] hash;
        /** The last access time written into the stored state. */
        final long sentAt;
        final boolean holdsAttributes;
        final boolean oversized;

        SentNote(byte[] hash, long sentAt, boolean holdsAttributes, boolean oversized) {
            this.hash = hash;
            this.sentAt = sentAt;
            this.holdsAttributes = holdsAttributes;
            this.oversized = oversized;
        }
    }

    /** The contract headers one response announces, and the note to record once they are sent. */
    private final class Announcement {
        /** The session id the state is for (the new one after a rotation). */
        private final String sessionId;
        private final Session session;
        final String state;
        final boolean ended;
        final String rotatedTo;
        private final SentNote note;

        Announcement(String sessionId, Session session, String state, boolean ended, String rotatedTo, SentNote note) {
            this.sessionId = sessionId;
            this.session = session;
            this.state = state;
            this.ended = ended;
            this.rotatedTo = rotatedTo;
            this.note = note;
        }

        boolean isEmpty() {
            return state == null && !ended && rotatedTo == null;
        }

        /** A new session id needs a new cookie, which only headers can set. */
        boolean trailerCanCarry() {
            return rotatedTo == null && !isEmpty();
        }

        Map<String, String> headers() {
            Map<String, String> headers = new LinkedHashMap<>();
            if (rotatedTo != null) {
                headers.put(sessionRotateHeader, rotatedTo);
            }
            if (state != null) {
                headers.put(sessionStateHeader, state);
            }
            if (ended) {
                headers.put(sessionEndHeader, "1");
            }
            return headers;
        }

        /**
         * A trailer carries x-session-state, or x-session-end for a session
         * the app ended: the proxy then tombstones the stored copy (it can no
         * longer drop the cookie; the next request to this instance is
         * answered "unknown", which does).
         */
        Map<String, String> trailerFields() {
            return ended ? Map.of(sessionEndHeader, "1") : Map.of(sessionStateHeader, state);
        }

        void sent(boolean inTrailer) {
            if (note != null) {
                session.setNote(SENT_NOTE, note);
            }
            if (inTrailer) {
                counters.add(Counter.STATES_SENT_IN_TRAILERS);
                return;
            }
            if (state != null) {
                counters.add(Counter.STATES_SENT);
            }
            if (ended && session != null) {
                counters.add(Counter.SESSIONS_ENDED);
            }
            if (rotatedTo != null) {
                counters.add(Counter.SESSIONS_ROTATED);
            }
        }
    }

    /**
     * One request of a session, and the trailer supplier that carries its
     * change when the response was committed before the app finished.
     */
    private final class Exchange implements Supplier<Map<String, String>> {
        final Request request;
        final String sid;
        final Session session;
        /** Set by finish() for a committed response. */
        volatile Announcement trailer;
        /** Async request: read the session when the response ends. */
        volatile boolean atEnd;
        /** A new session the app made: counted once. */
        final AtomicBoolean created = new AtomicBoolean();
        /** The session's requests in flight (null for a new session). */
        Overlap overlap;
        /** Requests of this session overlapped before this one: send the state even if unchanged. */
        boolean resend;

        /** The app's view of a request of a session found here (null otherwise): notes whether it got the session. */
        private final Watched watched;

        Exchange(Request request, String sid, Session session, boolean restored) {
            this.request = request;
            this.sid = sid;
            this.session = session;
            // Not by access time, as memcached-session-manager does: Tomcat's authenticator reads the session
            // on every request, so only the app's own getSession() tells.
            this.watched = session == null || restored ? null : new Watched(request.getRequest());
            if (watched != null) {
                request.setRequest(watched);
            }
        }

        /** True if the app never asked for the session, so it cannot have changed it. */
        boolean untouched(Session current) {
            return current == session && watched != null && !watched.asked;
        }

        @Override
        public Map<String, String> get() {
            Announcement announcement = atEnd ? announce(this) : trailer;
            if (announcement == null || announcement.isEmpty() || expiredByStop(this, announcement)) {
                return null;
            }
            if (!announcement.trailerCanCarry()) {
                counters.add(Counter.CHANGES_DEFERRED);
                return null;
            }
            Map<String, String> fields = announcement.trailerFields();
            announcement.sent(true);
            return fields;
        }
    }

    /** The request the app sees: notes whether it asked for its session. */
    private static final class Watched extends HttpServletRequestWrapper {
        volatile boolean asked;

        Watched(HttpServletRequest request) {
            super(request);
        }

        @Override
        public HttpSession getSession(boolean create) {
            asked = true;
            return super.getSession(create);
        }

        @Override
        public HttpSession getSession() {
            asked = true;
            return super.getSession();
        }

        @Override
        public String changeSessionId() {
            asked = true;
            return super.changeSessionId();
        }
    }

    // ------------------------------------------------------------ for tests

    long counter(Counter counter) {
        return counters.get(counter);
    }

    String getInstanceId() {
        return instanceId;
    }

    // ---------------------------------------------------------- configuration

    /** A file holding the signing key(s), e.g. a mounted Kubernetes Secret. Wins over keyEnvironment. */
    public void setKeyFile(String keyFile) {
        this.keyFile = keyFile;
    }

    /** The environment variable holding the signing key(s) when keyFile is not set. */
    public void setKeyEnvironment(String keyEnvironment) {
        this.keyEnvironment = keyEnvironment;
    }

    /** A regular expression of the app's class names allowed in restored state, e.g. {@code com\.example\.shop\..*}. */
    public void setAllowedClasses(String allowedClasses) {
        this.allowedClasses = allowedClasses;
    }

    /** The largest x-session-state (encoded characters) to send; a bigger state is sent without attributes. */
    public void setMaxStateBytes(int maxStateBytes) {
        this.maxStateBytes = maxStateBytes;
    }

    public int getMaxStateBytes() {
        return maxStateBytes;
    }

    /** The response buffer set before the app runs (0: Tomcat's default), so most pages stay uncommitted. */
    public void setBufferSize(int bufferSize) {
        this.bufferSize = bufferSize;
    }

    public int getBufferSize() {
        return bufferSize;
    }

    /** Whether a committed response carries its session change in an HTTP trailer. */
    public void setTrailers(boolean trailers) {
        this.trailers = trailers;
    }

    public boolean getTrailers() {
        return trailers;
    }

    /** An unchanged state is sent again after this many seconds of use, so the stored copy's last access stays fresh. */
    public void setRefreshSeconds(int refreshSeconds) {
        this.refreshSeconds = refreshSeconds;
    }

    public int getRefreshSeconds() {
        return refreshSeconds;
    }

    /**
     * A regular expression of the addresses the proxy's requests come from
     * (RemoteIpValve's convention). Contract headers from any other sender are
     * removed and ignored.
     */
    public void setInternalProxies(String internalProxies) {
        this.internalProxies = internalProxies;
    }

    public String getInternalProxies() {
        return internalProxies;
    }

    /** Bound into every signed state, with the host and context: states of other apps never restore here. */
    public void setAppId(String appId) {
        this.appId = appId == null ? "" : appId;
    }

    public String getAppId() {
        return appId;
    }

    /** Refuse restore states issued longer ago than this (0: only the session's own timeout applies). */
    public void setMaxStateAgeSeconds(int maxStateAgeSeconds) {
        this.maxStateAgeSeconds = maxStateAgeSeconds;
    }

    public int getMaxStateAgeSeconds() {
        return maxStateAgeSeconds;
    }

    public void setSessionIdHeader(String name) {
        this.sessionIdHeader = name;
    }

    public void setSessionNewHeader(String name) {
        this.sessionNewHeader = name;
    }

    public void setSessionStateHeader(String name) {
        this.sessionStateHeader = name;
    }

    public void setSessionUnknownHeader(String name) {
        this.sessionUnknownHeader = name;
    }

    public void setSessionEndHeader(String name) {
        this.sessionEndHeader = name;
    }

    public void setSessionUnreachedHeader(String name) {
        this.sessionUnreachedHeader = name;
    }

    public void setSessionRotateHeader(String name) {
        this.sessionRotateHeader = name;
    }

    public void setInstanceIdHeader(String name) {
        this.instanceIdHeader = name;
    }
}
