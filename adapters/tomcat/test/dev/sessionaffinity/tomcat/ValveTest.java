package dev.sessionaffinity.tomcat;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.TreeMap;
import java.util.regex.Pattern;

import org.apache.catalina.LifecycleException;
import org.junit.AfterClass;
import org.junit.BeforeClass;
import org.junit.Test;

import dev.sessionaffinity.demo.Cart;

/**
 * The valve's decisions, on two real embedded Tomcats (A and B) that share a
 * key, with the demo app behind the valve. B plays the pod a session moves to.
 */
public class ValveTest {

    private static final String STATE = "x-session-state";
    private static final Pattern ALLOWED = Attributes.allowList(EmbeddedTomcat.DEMO_CLASSES);
    private static File keyFile;
    private static EmbeddedTomcat a;
    private static EmbeddedTomcat b;
    private final StateCodec codec = new StateCodec(StateKeys.parse(StateKeysTest.KEY_1, "test"));

    @BeforeClass
    public static void startTomcats() throws Exception {
        keyFile = File.createTempFile("state-key", ".txt");
        Files.writeString(keyFile.toPath(), StateKeysTest.KEY_1);
        a = new EmbeddedTomcat(keyFile, valve -> { }, Map.of());
        b = new EmbeddedTomcat(keyFile, valve -> { }, Map.of());
    }

    @AfterClass
    public static void stopTomcats() throws Exception {
        a.close();
        b.close();
        Files.delete(keyFile.toPath());
    }

    private static Map<String, String> session(String sid, String... more) {
        Map<String, String> headers = new TreeMap<>(Map.of("x-session-id", sid));
        for (int i = 0; i < more.length; i += 2) {
            headers.put(more[i], more[i + 1]);
        }
        return headers;
    }

    /** A new session on tomcat with an apple in the cart; returns its sid. */
    private static String newSessionWithApple(EmbeddedTomcat tomcat) throws IOException {
        String sid = SessionIds.newSessionId();
        assertEquals(200, tomcat.send("GET", "/cart", session(sid, "x-session-new", "1")).status);
        RawHttp.Reply added = tomcat.send("POST", "/cart/add?item=apple", session(sid));
        assertNotNull(added.toString(), added.header(STATE));
        return sid;
    }

    /** B's answer to GET /cart with the session restored from state (as after a failover to B). */
    private static String restoredOnB(String sid, String state) throws IOException {
        assertNotNull("a state to restore", state);
        RawHttp.Reply reply = b.send("GET", "/cart", session(sid, "x-session-state", state));
        assertEquals(reply.toString(), 200, reply.status);
        return reply.body;
    }

    private static RawHttp.Reply expectUnknown(EmbeddedTomcat tomcat, Map<String, String> headers) throws IOException {
        int before = tomcat.appInvocations.get();
        RawHttp.Reply reply = tomcat.send("GET", "/cart", headers);
        assertEquals(reply.toString(), 409, reply.status);
        assertEquals("1", reply.header("x-session-unknown"));
        assertNull(reply.header(STATE));
        assertEquals("the app must not run", before, tomcat.appInvocations.get());
        return reply;
    }

    @Test
    public void withoutSessionIdTheRequestIsPlainTomcat() throws IOException {
        RawHttp.Reply reply = a.send("GET", "/cart", Map.of());
        assertEquals(200, reply.status);
        assertEquals(a.valve.getInstanceId(), reply.header("x-instance-id"));
        assertTrue(reply.toString(), reply.header("set-cookie").startsWith("JSESSIONID="));
        assertNull(reply.header(STATE));
        assertNull(reply.header("transfer-encoding"));
    }

    @Test
    public void anIdNotInTheProxyFormatIsServedLikePlainTomcat() throws IOException {
        long before = a.valve.counter(Counter.INVALID_SESSION_IDS);
        RawHttp.Reply reply = a.send("GET", "/cart", session("not-a-session-id"));
        assertEquals(200, reply.status);
        assertNull(reply.header("x-session-unknown"));
        assertEquals(before + 1, a.valve.counter(Counter.INVALID_SESSION_IDS));
    }

    @Test
    public void anUnknownSessionIsAnsweredWithoutRunningTheApp() throws IOException {
        RawHttp.Reply reply = expectUnknown(a, session(SessionIds.newSessionId()));
        assertEquals(a.valve.getInstanceId(), reply.header("x-instance-id"));
        assertNull(reply.header("x-session-end"));
    }

    @Test
    public void aNewSessionUsesTheProxysIdAndSendsStateOnlyWhenItChanges() throws IOException {
        String sid = SessionIds.newSessionId();
        RawHttp.Reply created = a.send("GET", "/cart", session(sid, "x-session-new", "1"));
        assertTrue(created.body, created.body.contains("\"session\":\"" + sid + "\""));
        assertTrue("new on its first request", created.body.contains("\"new\":true"));
        String cookie = created.header("set-cookie");
        assertTrue("Tomcat's own cookie, if any, carries the proxy's id", cookie == null || cookie.startsWith("JSESSIONID=" + sid + ";"));
        assertTrue(a.send("GET", "/cart", session(sid)).body.contains("\"new\":false"));
        RawHttp.Reply added = a.send("POST", "/cart/add?item=apple", session(sid));
        assertNotNull(added.header(STATE));
        assertNull("reading changes nothing", a.send("GET", "/cart", session(sid)).header(STATE));
        // The cart changes a nested object in place: only the serialized form shows it.
        RawHttp.Reply again = a.send("POST", "/cart/add?item=apple", session(sid));
        assertNotNull(again.header(STATE));
        assertNotEquals(added.header(STATE), again.header(STATE));
        assertNull(again.header("transfer-encoding"));
        assertNotNull("Content-Length framing is kept", again.header("content-length"));
    }

    @Test
    public void aNewSessionIsMadeOnlyWhenTheAppAsksForOne() throws IOException {
        String sid = SessionIds.newSessionId();
        long created = a.valve.counter(Counter.SESSIONS_CREATED);
        RawHttp.Reply probe = a.send("GET", "/healthz", session(sid, "x-session-new", "1"));
        assertEquals(200, probe.status);
        assertNull("no session was made", a.context.getManager().findSession(sid));
        assertEquals("1", probe.header("x-session-end"));
        assertNull(probe.header(STATE));
        assertEquals(created, a.valve.counter(Counter.SESSIONS_CREATED));
        RawHttp.Reply cart = a.send("GET", "/cart", session(sid, "x-session-new", "1"));
        assertTrue(cart.body, cart.body.contains("\"session\":\"" + sid + "\"") && cart.body.contains("\"new\":true"));
        assertNull(cart.header("x-session-end"));
        assertNotNull("a new session's state goes to the store", cart.header(STATE));
        assertEquals(created + 1, a.valve.counter(Counter.SESSIONS_CREATED));
        assertNotNull(a.context.getManager().findSession(sid));
    }

    @Test
    public void aRequestThatNeverGetsTheSessionSerializesNothing() throws Exception {
        String sid = newSessionWithApple(a);
        long untouched = a.valve.counter(Counter.REQUESTS_UNTOUCHED);
        RawHttp.Reply probe = a.send("GET", "/healthz", session(sid));
        assertEquals(200, probe.status);
        assertNull(probe.header(STATE));
        assertEquals(untouched + 1, a.valve.counter(Counter.REQUESTS_UNTOUCHED));
        assertNotNull("a request that changes it still sends", a.send("POST", "/cart/add?item=fig", session(sid)).header(STATE));
        assertEquals(untouched + 1, a.valve.counter(Counter.REQUESTS_UNTOUCHED));
    }

    @Test
    public void connectorLimitsTooSmallForMaxStateBytesAreNamedAtStart() throws Exception {
        java.util.logging.Logger logger = java.util.logging.Logger.getLogger(SessionAffinityValve.class.getName());
        List<String> warnings = new java.util.concurrent.CopyOnWriteArrayList<>();
        java.util.logging.Handler handler = new java.util.logging.Handler() {
            @Override
            public void publish(java.util.logging.LogRecord record) {
                warnings.add(record.getMessage());
            }

            @Override
            public void flush() {
            }

            @Override
            public void close() {
            }
        };
        logger.addHandler(handler);
        try (EmbeddedTomcat small = new EmbeddedTomcat(keyFile, valve -> { },
                Map.of("maxHttpRequestHeaderSize", "4096", "maxHttpResponseHeaderSize", "4096"))) {
            assertEquals(200, small.send("GET", "/healthz", Map.of()).status);
            assertTrue(warnings.toString(), warnings.stream().anyMatch(w -> w.contains("set maxHttpRequestHeaderSize=\"8192\"")));
            assertTrue(warnings.toString(), warnings.stream().anyMatch(w -> w.contains("set maxHttpResponseHeaderSize=\"8192\"")));
        } finally {
            logger.removeHandler(handler);
        }
    }

    @Test
    public void aContainerLoginStaysLoggedInAfterAMove() throws Exception {
        try (EmbeddedTomcat from = new EmbeddedTomcat(keyFile, valve -> { }, Map.of(), true);
                EmbeddedTomcat to = new EmbeddedTomcat(keyFile, valve -> { }, Map.of(), true)) {
            String sid = SessionIds.newSessionId();
            from.send("GET", "/cart", session(sid, "x-session-new", "1"));
            String basic = "Basic " + java.util.Base64.getEncoder().encodeToString(
                    ("ann:" + EmbeddedTomcat.PASSWORD).getBytes(java.nio.charset.StandardCharsets.UTF_8));
            RawHttp.Reply added = from.send("POST", "/cart/add?item=apple", session(sid, "authorization", basic));
            assertEquals(added.toString(), 200, added.status);
            sid = added.header("x-session-rotate"); // Tomcat changes the session id on authentication
            assertTrue(added.toString(), SessionIds.isSessionId(sid));
            assertEquals("the login is cached in the session", 200, from.send("POST", "/cart/add?item=fig", session(sid)).status);
            String state = from.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
            RawHttp.Reply moved = to.send("POST", "/cart/add?item=plum", session(sid, STATE, state));
            assertEquals("no new login after the move: " + moved, 200, moved.status);
            assertTrue(moved.body, moved.body.contains("\"items\":{\"apple\":1,\"fig\":1,\"pear\":1,\"plum\":1}"));
            assertFalse("the login is not a session attribute", moved.body.contains("Login"));
            assertEquals("a stranger still needs to log in", 401,
                    to.send("POST", "/cart/add?item=kiwi", session(SessionIds.newSessionId(), "x-session-new", "1")).status);
        }
    }

    @Test
    public void aStateMovesTheSessionToAnotherTomcat() throws Exception {
        String sid = newSessionWithApple(a);
        a.send("POST", "/ttl?seconds=900", session(sid));
        String state = a.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
        long restoredBefore = b.valve.counter(Counter.SESSIONS_RESTORED);
        RawHttp.Reply moved = b.send("GET", "/cart", session(sid, "x-session-state", state));
        assertEquals(moved.toString(), 200, moved.status);
        assertTrue(moved.body, moved.body.contains("\"items\":{\"apple\":1,\"pear\":1}"));
        assertTrue(moved.body, moved.body.contains("\"max_inactive\":900"));
        assertEquals(restoredBefore + 1, b.valve.counter(Counter.SESSIONS_RESTORED));
        assertNull("the unchanged, fresh state is not sent back", moved.header(STATE));
        assertEquals(200, b.send("GET", "/cart", session(sid)).status);
    }

    @Test
    public void aStaleLocalCopyIsReplacedByTheRestoredState() throws Exception {
        String sid = newSessionWithApple(a);
        String older = a.send("GET", "/cart", session(sid)).header(STATE);
        assertNull(older);
        String state = a.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
        b.send("GET", "/cart", session(sid, "x-session-state", state));
        b.send("POST", "/cart/add?item=plum", session(sid)); // the session lives on B now
        String fromB = b.send("POST", "/cart/add?item=fig", session(sid)).header(STATE);
        RawHttp.Reply back = a.send("GET", "/cart", session(sid, "x-session-state", fromB));
        assertTrue(back.body, back.body.contains("\"items\":{\"apple\":1,\"pear\":1,\"plum\":1,\"fig\":1}"));
    }

    @Test
    public void concurrentRequestsCarryingOneStateShareOneRestoredSession() throws Exception {
        int rounds = 20;
        int parallel = 6;
        ExecutorService pool = Executors.newFixedThreadPool(parallel);
        try {
            for (int round = 0; round < rounds; round++) {
                String sid = newSessionWithApple(a);
                String state = a.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
                long restored = b.valve.counter(Counter.SESSIONS_RESTORED);
                CyclicBarrier start = new CyclicBarrier(parallel);
                List<Future<RawHttp.Reply>> replies = new ArrayList<>();
                for (int i = 0; i < parallel; i++) {
                    replies.add(pool.submit(() -> {
                        start.await(10, TimeUnit.SECONDS);
                        return b.send("POST", "/cart/add?item=fig", session(sid, STATE, state));
                    }));
                }
                for (Future<RawHttp.Reply> reply : replies) {
                    assertEquals("round " + round, 200, reply.get(30, TimeUnit.SECONDS).status);
                }
                assertEquals("round " + round + ": restored once", restored + 1, b.valve.counter(Counter.SESSIONS_RESTORED));
                String cart = b.send("GET", "/cart", session(sid)).body;
                assertTrue("round " + round + ": every request's change in the one session: " + cart,
                        cart.contains("\"fig\":" + parallel));
            }
        } finally {
            pool.shutdownNow();
        }
    }

    @Test
    public void aStaleLocalCopyReplacedByARestoreIsDestroyedLikeAnExpiry() throws Exception {
        String sid = newSessionWithApple(a);
        String state = a.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
        restoredOnB(sid, state);
        String fromB = b.send("POST", "/cart/add?item=fig", session(sid)).header(STATE);
        int destroyed = a.sessionsDestroyed.get();
        assertTrue(a.send("GET", "/cart", session(sid, STATE, fromB)).body.contains("\"fig\":1"));
        assertEquals("sessionDestroyed for the stale copy", destroyed + 1, a.sessionsDestroyed.get());
    }

    @Test
    public void afterOverlappingRequestsTheNextResponseResendsTheState() throws Exception {
        String sid = newSessionWithApple(a);
        a.entered = new CountDownLatch(1);
        a.release = new CountDownLatch(1);
        ExecutorService pool = Executors.newSingleThreadExecutor();
        try {
            Future<RawHttp.Reply> slow = pool.submit(() -> a.send("GET", "/cart?hold=1", session(sid)));
            assertTrue(a.entered.await(10, TimeUnit.SECONDS));
            assertNotNull(a.send("POST", "/cart/add?item=pear", session(sid)).header(STATE));
            a.release.countDown();
            assertEquals(200, slow.get(30, TimeUnit.SECONDS).status);
        } finally {
            a.release.countDown();
            pool.shutdownNow();
        }
        String resent = a.send("GET", "/cart", session(sid)).header(STATE);
        assertNotNull("the first request after the overlap resends the unchanged state", resent);
        assertTrue(restoredOnB(sid, resent).contains("\"items\":{\"apple\":1,\"pear\":1}"));
        assertNull("then only changes are sent again", a.send("GET", "/cart", session(sid)).header(STATE));
    }

    /** Two-phase rotation from KEY_1 to KEY_2 with pods of every phase serving at once. */
    @Test
    public void keyRotationInTwoPhasesNeverRefusesARestore() throws Exception {
        File phase1 = File.createTempFile("state-key", ".txt");
        File phase2 = File.createTempFile("state-key", ".txt");
        Files.writeString(phase1.toPath(), StateKeysTest.KEY_1 + " verify:" + StateKeysTest.KEY_2);
        Files.writeString(phase2.toPath(), StateKeysTest.KEY_2 + "\n" + StateKeysTest.KEY_1);
        try (EmbeddedTomcat verifying = new EmbeddedTomcat(phase1, valve -> { }, Map.of());
                EmbeddedTomcat signing = new EmbeddedTomcat(phase2, valve -> { }, Map.of())) {
            // Phase 1 (old pods A and B next to pods with the new key verify-only), then phase 2 (next to pods signing with it).
            List<List<EmbeddedTomcat>> rolls = List.of(List.of(a, verifying), List.of(verifying, signing));
            for (List<EmbeddedTomcat> pods : rolls) {
                for (EmbeddedTomcat from : pods) {
                    for (EmbeddedTomcat to : pods) {
                        String sid = newSessionWithApple(from);
                        String state = from.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
                        RawHttp.Reply moved = to.send("GET", "/cart", session(sid, STATE, state));
                        assertEquals(moved.toString(), 200, moved.status);
                        assertTrue(moved.body, moved.body.contains("\"items\":{\"apple\":1,\"pear\":1}"));
                    }
                }
            }
        } finally {
            Files.delete(phase1.toPath());
            Files.delete(phase2.toPath());
        }
    }

    @Test
    public void onlyTheProxysAddressesMaySpeakTheContractAndStatesAreBoundToTheirApp() throws Exception {
        String sid = newSessionWithApple(a);
        String state = a.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
        try (EmbeddedTomcat behindAProxy = new EmbeddedTomcat(keyFile, valve -> valve.setInternalProxies("10\\.9\\.9\\.9"), Map.of());
                EmbeddedTomcat otherApp = new EmbeddedTomcat(keyFile, valve -> valve.setAppId("billing"), Map.of())) {
            // The test's requests come from 127.0.0.1, which is not the proxy here.
            RawHttp.Reply picked = behindAProxy.send("GET", "/cart", session(SessionIds.newSessionId(), "x-session-new", "1"));
            assertEquals(200, picked.status);
            assertTrue("Tomcat's own session, not the sender's id", picked.body.contains("\"new\":true")
                    && picked.header("set-cookie").startsWith("JSESSIONID="));
            assertNull(picked.header("x-session-end"));
            RawHttp.Reply replayed = behindAProxy.send("GET", "/cart", session(sid, STATE, state));
            assertFalse("a replayed state is ignored", replayed.body.contains("apple"));
            assertEquals(0, behindAProxy.valve.counter(Counter.SESSIONS_RESTORED));
            assertEquals(2, behindAProxy.valve.counter(Counter.UNTRUSTED_SENDERS));
            long other = otherApp.valve.counter(Counter.RESTORES_REFUSED_OTHER_SESSION);
            expectUnknown(otherApp, session(sid, STATE, state));
            assertEquals("signed for another app id", other + 1, otherApp.valve.counter(Counter.RESTORES_REFUSED_OTHER_SESSION));
        }
    }

    @Test
    public void aStateOlderThanMaxStateAgeIsRefused() throws Exception {
        String sid = SessionIds.newSessionId();
        long issued = System.currentTimeMillis() - 600_000;
        String state = codec.encode(new SessionState(sid, "localhost", issued, issued, 3600, Attributes.none()));
        try (EmbeddedTomcat capped = new EmbeddedTomcat(keyFile, valve -> valve.setMaxStateAgeSeconds(300), Map.of())) {
            expectUnknown(capped, session(sid, STATE, state));
            assertEquals(1, capped.valve.counter(Counter.RESTORES_REFUSED_EXPIRED));
        }
        assertEquals("within the session's timeout, no cap: restored", 200, b.send("GET", "/cart", session(sid, STATE, state)).status);
    }

    @Test
    public void aTamperedStateIsRefusedAndCounted() throws Exception {
        String sid = newSessionWithApple(a);
        String state = a.send("POST", "/cart/add?item=pear", session(sid)).header(STATE);
        char last = state.charAt(state.length() / 2);
        String tampered = state.substring(0, state.length() / 2) + (last == 'A' ? 'B' : 'A') + state.substring(state.length() / 2 + 1);
        long before = b.valve.counter(Counter.RESTORES_REFUSED_SIGNATURE);
        RawHttp.Reply reply = expectUnknown(b, session(sid, "x-session-state", tampered));
        assertNull("a refused signature is not an end", reply.header("x-session-end"));
        assertEquals(before + 1, b.valve.counter(Counter.RESTORES_REFUSED_SIGNATURE));
        long other = b.valve.counter(Counter.RESTORES_REFUSED_OTHER_SESSION);
        expectUnknown(b, session(SessionIds.newSessionId(), "x-session-state", state));
        assertEquals(other + 1, b.valve.counter(Counter.RESTORES_REFUSED_OTHER_SESSION));
    }

    @Test
    public void anAttributeHoldingAClassOutsideTheAllowListIsLeftOutOfTheRestoredSession() throws Exception {
        String sid = SessionIds.newSessionId();
        long now = System.currentTimeMillis();
        Cart cart = new Cart();
        cart.add("apple", 1);
        // As written by a pod whose allow-list lets the gadget in.
        byte[] attributes = Attributes.write(new TreeMap<>(Map.of("x", new AttributesTest.Gadget(), "cart", cart)),
                Pattern.compile(".*")).bytes;
        String state = codec.encode(new SessionState(sid, "localhost", now, now, 1800, attributes));
        AttributesTest.Gadget.ran = false;
        long before = b.valve.counter(Counter.ATTRIBUTES_NOT_RESTORED);
        assertTrue(restoredOnB(sid, state).contains("\"items\":{\"apple\":1}"));
        assertEquals(before + 1, b.valve.counter(Counter.ATTRIBUTES_NOT_RESTORED));
        assertFalse(AttributesTest.Gadget.ran);
    }

    @Test
    public void anExpiredStateIsRefusedAsEnded() throws Exception {
        String sid = SessionIds.newSessionId();
        long idle = System.currentTimeMillis() - 120_000;
        String state = codec.encode(new SessionState(sid, "localhost", idle - 1000, idle, 60, Attributes.none()));
        long before = b.valve.counter(Counter.RESTORES_REFUSED_EXPIRED);
        RawHttp.Reply reply = expectUnknown(b, session(sid, "x-session-state", state));
        assertEquals("1", reply.header("x-session-end"));
        assertEquals(before + 1, b.valve.counter(Counter.RESTORES_REFUSED_EXPIRED));
    }

    @Test
    public void aSessionTomcatExpiredIsNeverResurrected() throws Exception {
        String sid = newSessionWithApple(a);
        a.send("POST", "/ttl?seconds=1", session(sid));
        Thread.sleep(1100); // the session's own timeout has to pass
        RawHttp.Reply reply = expectUnknown(a, session(sid));
        assertEquals("1", reply.header("x-session-end"));
        expectUnknown(a, session(sid, "x-session-new", "0"));
    }

    @Test
    public void aSessionOlderThanItsTimeoutButInUseIsRestoredAndStays() throws Exception {
        String sid = SessionIds.newSessionId();
        long now = System.currentTimeMillis();
        Cart cart = new Cart();
        cart.add("apple", 1);
        byte[] attributes = Attributes.write(new TreeMap<>(Map.of("cart", cart)), ALLOWED).bytes;
        String state = codec.encode(new SessionState(sid, "localhost", now - 7_200_000, now - 60_000, 1800, attributes));
        assertEquals(200, b.send("GET", "/healthz", session(sid, "x-session-state", state)).status);
        RawHttp.Reply next = b.send("GET", "/cart", session(sid));
        assertEquals(next.toString(), 200, next.status);
        assertTrue(next.body, next.body.contains("\"apple\":1"));
    }

    @Test
    public void anOldUnchangedStateIsRefreshedOnItsFirstResponse() throws Exception {
        String sid = SessionIds.newSessionId();
        long then = System.currentTimeMillis() - 300_000;
        Cart cart = new Cart();
        cart.add("apple", 2);
        byte[] attributes = Attributes.write(new TreeMap<>(Map.of("cart", cart)), ALLOWED).bytes;
        String state = codec.encode(new SessionState(sid, "localhost", then, then, 1800, attributes));
        RawHttp.Reply reply = b.send("GET", "/cart", session(sid, "x-session-state", state));
        assertEquals(200, reply.status);
        SessionState refreshed = codec.decode(reply.header(STATE), sid, "localhost", System.currentTimeMillis());
        assertTrue(refreshed.lastAccessedTime > then + 290_000);
        assertEquals(then, refreshed.creationTime);
    }

    @Test
    public void logoutEndsTheSession() throws IOException {
        String sid = newSessionWithApple(a);
        RawHttp.Reply reply = a.send("POST", "/logout", session(sid));
        assertEquals("1", reply.header("x-session-end"));
        assertNull(reply.header(STATE));
        expectUnknown(a, session(sid));
    }

    @Test
    public void loginRotatesToANewIdWithAStateBoundToIt() throws Exception {
        String sid = newSessionWithApple(a);
        RawHttp.Reply login = a.send("POST", "/login?user=ann", session(sid));
        String newSid = login.header("x-session-rotate");
        assertTrue(login.toString(), SessionIds.isSessionId(newSid));
        assertNotEquals(sid, newSid);
        SessionState state = codec.decode(login.header(STATE), newSid, "localhost", System.currentTimeMillis());
        assertEquals(newSid, state.sessionId);
        expectUnknown(a, session(sid));
        RawHttp.Reply after = a.send("GET", "/cart", session(newSid));
        assertTrue(after.body, after.body.contains("\"user\":\"ann\""));
        String moved = restoredOnB(newSid, login.header(STATE));
        assertTrue(moved, moved.contains("\"user\":\"ann\",\"items\":{\"apple\":1}"));
    }

    @Test
    public void invalidatingAndMakingANewSessionIsARotationToo() throws Exception {
        String sid = newSessionWithApple(a);
        RawHttp.Reply login = a.send("POST", "/login?user=bob&style=replace", session(sid));
        String newSid = login.header("x-session-rotate");
        assertTrue(login.toString(), SessionIds.isSessionId(newSid) && !newSid.equals(sid));
        assertNull("the session goes on under a new id: no end", login.header("x-session-end"));
        assertEquals(newSid, codec.decode(login.header(STATE), newSid, "localhost", System.currentTimeMillis()).sessionId);
        expectUnknown(a, session(sid));
        assertTrue(a.send("GET", "/cart", session(newSid)).body.contains("\"user\":\"bob\""));
    }

    @Test
    public void anAsyncResponseCarriesTheChangeInATrailer() throws Exception {
        String sid = newSessionWithApple(a);
        RawHttp.Reply reply = a.send("POST", "/async?item=kiwi", session(sid));
        assertEquals(reply.toString(), 200, reply.status);
        assertTrue(reply.body, reply.body.contains("\"kiwi\":1"));
        String moved = restoredOnB(sid, reply.trailers.get(STATE));
        assertTrue(moved, moved.contains("\"items\":{\"apple\":1,\"kiwi\":1}"));
    }

    @Test
    public void aCommittedResponseCarriesTheStateInATrailer() throws Exception {
        String sid = newSessionWithApple(a);
        RawHttp.Reply reply = a.send("POST", "/flush?item=pear", session(sid));
        assertEquals("chunked", reply.header("transfer-encoding"));
        assertNull(reply.header(STATE));
        String moved = restoredOnB(sid, reply.trailers.get(STATE));
        assertTrue(moved, moved.contains("\"items\":{\"apple\":1,\"pear\":1}"));
    }

    @Test
    public void aLogoutOnACommittedResponseIsAnnouncedInTheTrailer() throws Exception {
        String sid = newSessionWithApple(a);
        RawHttp.Reply reply = a.send("POST", "/flush?then=logout", session(sid));
        assertTrue(reply.body, reply.body.contains("\"logged_out\":true"));
        assertNull("the end cannot go in a header any more", reply.header("x-session-end"));
        assertEquals("1", reply.trailers.get("x-session-end"));
        assertNull("no state for an ended session", reply.trailers.get(STATE));
        expectUnknown(a, session(sid));
    }

    @Test
    public void withoutTrailersTheNextResponseCarriesTheChange() throws Exception {
        String sid = newSessionWithApple(a);
        long deferred = a.valve.counter(Counter.CHANGES_DEFERRED);
        RawHttp.Reply reply = RawHttp.send(a.port(), "POST", "/flush?item=pear", session(sid), "HTTP/1.0");
        assertEquals(200, reply.status);
        assertNull(reply.header(STATE));
        assertEquals(deferred + 1, a.valve.counter(Counter.CHANGES_DEFERRED));
        String state = a.send("GET", "/cart", session(sid)).header(STATE);
        assertNotNull("the next response sends the change", state);
        assertTrue(codec.decode(state, sid, "localhost", System.currentTimeMillis()).attributes.length > 0);
    }

    @Test
    public void anAttributeThatCannotBeSerializedIsSkippedAndCounted() throws Exception {
        String sid = newSessionWithApple(a);
        long before = a.valve.counter(Counter.ATTRIBUTES_SKIPPED);
        String state = a.send("POST", "/helper", session(sid)).header(STATE);
        assertEquals(before + 1, a.valve.counter(Counter.ATTRIBUTES_SKIPPED));
        state = state != null ? state : a.send("POST", "/cart/add?item=fig", session(sid)).header(STATE);
        String moved = restoredOnB(sid, state);
        assertTrue(moved, moved.contains("\"items\":{\"apple\":1") && moved.contains("\"helper\":false"));
    }

    @Test
    public void anOversizedStateIsSentWithoutAttributesNotAsA500() throws Exception {
        String sid = newSessionWithApple(a);
        long before = a.valve.counter(Counter.STATES_OVERSIZED);
        RawHttp.Reply reply = a.send("POST", "/big?kb=16", session(sid));
        assertEquals(200, reply.status);
        assertEquals(before + 1, a.valve.counter(Counter.STATES_OVERSIZED));
        String state = reply.header(STATE);
        assertTrue(state.length() <= a.valve.getMaxStateBytes());
        assertEquals(Attributes.none().length, codec.decode(state, sid, "localhost", System.currentTimeMillis()).attributes.length);
        RawHttp.Reply smaller = a.send("POST", "/big?kb=0", session(sid));
        assertTrue("back under the cap, the attributes travel again",
                codec.decode(smaller.header(STATE), sid, "localhost", System.currentTimeMillis()).attributes.length > 100);
    }

    @Test
    public void aStateWithNoRoomInTheHeadersGoesInTheTrailer() throws Exception {
        // 2 KiB of random bytes: a state of about 2.8 KB, under maxStateBytes but over this connector's header limit.
        try (EmbeddedTomcat tight = new EmbeddedTomcat(keyFile, valve -> { }, Map.of("maxHttpResponseHeaderSize", "2048"))) {
            String sid = SessionIds.newSessionId();
            tight.send("GET", "/cart", session(sid, "x-session-new", "1"));
            RawHttp.Reply reply = tight.send("POST", "/big?kb=2", session(sid));
            assertEquals(reply.toString(), 200, reply.status);
            assertNull(reply.header(STATE));
            String state = reply.trailers.get(STATE);
            assertNotNull(reply.toString(), state);
            assertTrue(state.length() > 2048 && state.length() < tight.valve.getMaxStateBytes());
        }
    }

    @Test
    public void aLoginWhoseStateHasNoRoomInTheHeadersStillRotatesAtOnce() throws Exception {
        try (EmbeddedTomcat tight = new EmbeddedTomcat(keyFile, valve -> { }, Map.of("maxHttpResponseHeaderSize", "2048"))) {
            String sid = SessionIds.newSessionId();
            tight.send("GET", "/cart", session(sid, "x-session-new", "1"));
            tight.send("POST", "/big?kb=2", session(sid));
            long rotated = tight.valve.counter(Counter.SESSIONS_ROTATED);
            RawHttp.Reply login = tight.send("POST", "/login?user=ann", session(sid));
            assertEquals(login.toString(), 200, login.status);
            String newSid = login.header("x-session-rotate");
            assertTrue(login.toString(), SessionIds.isSessionId(newSid) && !newSid.equals(sid));
            assertEquals(rotated + 1, tight.valve.counter(Counter.SESSIONS_ROTATED));
            long now = System.currentTimeMillis();
            assertEquals("the header state: the new id, no attributes", Attributes.none().length,
                    codec.decode(login.header(STATE), newSid, "localhost", now).attributes.length);
            assertTrue("the full state follows in the trailer",
                    codec.decode(login.trailers.get(STATE), newSid, "localhost", now).attributes.length > 2048);
            String moved = restoredOnB(newSid, login.trailers.get(STATE));
            assertTrue(moved, moved.contains("\"user\":\"ann\"") && moved.contains("\"report_bytes\":2048"));
        }
    }

    /** The README's settings for big sessions: a 64 KiB serialized session moves between two Tomcats in headers. */
    @Test
    public void a64KiBSessionMovesWithTheDocumentedSettings() throws Exception {
        Map<String, String> connector = Map.of("maxHttpRequestHeaderSize", "131072", "maxHttpResponseHeaderSize", "131072");
        try (EmbeddedTomcat from = new EmbeddedTomcat(keyFile, valve -> valve.setMaxStateBytes(98304), connector);
                EmbeddedTomcat to = new EmbeddedTomcat(keyFile, valve -> valve.setMaxStateBytes(98304), connector)) {
            String sid = SessionIds.newSessionId();
            from.send("GET", "/cart", session(sid, "x-session-new", "1"));
            RawHttp.Reply big = from.send("POST", "/big?kb=64", session(sid));
            String state = big.header(STATE);
            assertNotNull("in a header: " + big, state);
            assertTrue(state.length() + " characters", state.length() > 64 * 1024 * 4 / 3 && state.length() <= 98304);
            RawHttp.Reply moved = to.send("GET", "/cart", session(sid, STATE, state));
            assertEquals(moved.toString(), 200, moved.status);
            assertTrue(moved.body, moved.body.contains("\"report_bytes\":65536"));
        }
    }

    @Test
    public void aFileSentWithSendfileIsNeverFramedForATrailer() throws Exception {
        // A restored state of about 2.8 KB, due for refresh, on a connector whose headers cannot hold it.
        try (EmbeddedTomcat tight = new EmbeddedTomcat(keyFile, valve -> { }, Map.of("maxHttpResponseHeaderSize", "2048"))) {
            byte[] file = randomBytes(64 * 1024); // over DefaultServlet's 48 KiB sendfile threshold
            tight.addFile("big.bin", file);
            String sid = SessionIds.newSessionId();
            long then = System.currentTimeMillis() - 300_000;
            byte[] attributes = Attributes.write(new TreeMap<>(Map.of("report", randomBytes(2048))), ALLOWED).bytes;
            String state = codec.encode(new SessionState(sid, "localhost", then, then, 1800, attributes));
            long inTrailers = tight.valve.counter(Counter.STATES_SENT_IN_TRAILERS);
            long deferred = tight.valve.counter(Counter.CHANGES_DEFERRED);
            RawHttp.Reply reply = tight.send("GET", "/files/big.bin", session(sid, STATE, state));
            assertEquals(200, reply.status);
            assertNull(reply.header("transfer-encoding"));
            assertEquals(String.valueOf(file.length), reply.header("content-length"));
            assertArrayEquals(file, reply.bodyBytes);
            assertEquals(inTrailers, tight.valve.counter(Counter.STATES_SENT_IN_TRAILERS));
            assertEquals(deferred + 1, tight.valve.counter(Counter.CHANGES_DEFERRED));
            RawHttp.Reply next = tight.send("GET", "/cart", session(sid));
            assertNotNull("the session's next response carries the state", next.trailers.get(STATE));
        }
    }

    private static byte[] randomBytes(int length) {
        byte[] bytes = new byte[length];
        new Random(length).nextBytes(bytes);
        return bytes;
    }

    @Test
    public void aContextWithoutAKeyDoesNotStart() throws Exception {
        File missing = new File(keyFile.getPath() + ".missing");
        LifecycleException e = assertThrows(LifecycleException.class, () -> new EmbeddedTomcat(missing, valve -> { }, Map.of()));
        Throwable cause = e;
        while (cause.getCause() != null) {
            cause = cause.getCause();
        }
        assertEquals("SessionAffinityValve keyFile: cannot read " + missing + " (NoSuchFileException)", cause.getMessage());
    }
}
