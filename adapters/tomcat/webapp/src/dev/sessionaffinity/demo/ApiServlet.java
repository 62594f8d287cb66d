package dev.sessionaffinity.demo;

import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.security.SecureRandom;
import java.util.EnumSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.PriorityQueue;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.atomic.AtomicInteger;

import jakarta.servlet.AsyncContext;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpSession;

import javax.management.JMException;
import javax.management.MBeanAttributeInfo;
import javax.management.MBeanServer;
import javax.management.ObjectName;

/**
 * The demo's JSON API: a cart in the HttpSession, login and logout, and the
 * session shapes the adapter must handle (a non-Serializable attribute, a big
 * state, a response committed before the session changes, a short timeout).
 *
 * <pre>
 * GET  /cart         the session as JSON (reads only), and which Tomcat answered
 * POST /cart/add     item, qty: add to the cart (changes a nested object in place)
 * POST /login        user: changeSessionId(), then remember the user
 *                    (style=replace: the older idiom, invalidate() and a new session)
 * POST /logout       invalidate the session
 * POST /helper       store a non-Serializable attribute
 * POST /big          kb: store kb KiB of random bytes (0 removes them)
 * POST /flush        item: commit the response, then add item to the cart
 *                    (then=logout: commit the response, then invalidate the session)
 * POST /async        item: add to the cart from another thread (startAsync)
 * POST /ttl          seconds: the session's max inactive interval
 * POST /saved        store attributes shaped like a real app's (see saved()), and one the
 *                    valve's allow-list refuses (a PriorityQueue)
 * GET  /saved        those attributes as JSON
 * GET  /counters     the SessionAffinityValve's JMX counters
 * GET  /healthz      200 while the app is up
 * </pre>
 */
public final class ApiServlet extends HttpServlet {

    private static final long serialVersionUID = 1L;
    private static final SecureRandom RANDOM = new SecureRandom();

    /** An app enum, for the enum set in the session. */
    enum Role { USER, BUYER, ADMIN }

    @Override
    protected void doGet(HttpServletRequest request, HttpServletResponse response) throws IOException {
        switch (request.getServletPath()) {
            case "/healthz":
                send(response, Map.of("status", "ok"));
                break;
            case "/counters":
                send(response, counters());
                break;
            case "/cart":
                send(response, view(request, request.getSession()));
                break;
            case "/saved":
                send(response, savedView(request, request.getSession()));
                break;
            default:
                response.sendError(404);
        }
    }

    @Override
    protected void doPost(HttpServletRequest request, HttpServletResponse response) throws IOException {
        HttpSession session = request.getSession();
        switch (request.getServletPath()) {
            case "/cart/add":
                cart(session).add(request.getParameter("item"), quantity(request));
                break;
            case "/login":
                session = login(request, session);
                break;
            case "/logout":
                session.invalidate();
                send(response, Map.of("logged_out", true));
                return;
            case "/helper":
                session.setAttribute("helper", new RenderHelper());
                break;
            case "/big":
                big(session, Integer.parseInt(request.getParameter("kb")));
                break;
            case "/flush":
                flushThenAdd(request, response, session);
                return;
            case "/async":
                addLater(request, session);
                return;
            case "/ttl":
                session.setMaxInactiveInterval(Integer.parseInt(request.getParameter("seconds")));
                break;
            case "/saved":
                saved(session);
                send(response, savedView(request, session));
                return;
            default:
                response.sendError(404);
                return;
        }
        send(response, view(request, session));
    }

    static Cart cart(HttpSession session) {
        Cart cart = (Cart) session.getAttribute("cart");
        if (cart == null) {
            cart = new Cart();
            session.setAttribute("cart", cart);
        }
        return cart;
    }

    /**
     * What real apps keep in sessions: a Spring-Security-like saved request
     * (case-insensitive TreeMaps, a Date, an app class), JDK concurrent types,
     * an enum set; and a PriorityQueue, outside the valve's allow-list.
     */
    private static void saved(HttpSession session) {
        session.setAttribute("SPRING_SECURITY_SAVED_REQUEST", new SavedRequest("/account?tab=orders",
                Map.of("Accept", List.of("text/html"), "User-Agent", List.of("demo")), Map.of("tab", new String[] {"orders"})));
        session.setAttribute("visits", new ConcurrentHashMap<>(Map.of("/account", 2)));
        session.setAttribute("hits", new AtomicInteger(7));
        session.setAttribute("roles", EnumSet.of(Role.USER, Role.BUYER));
        session.setAttribute("listeners", new CopyOnWriteArrayList<>(List.of("audit")));
        session.setAttribute("queue", new PriorityQueue<>(List.of(3, 1, 2)));
    }

    private static Map<String, Object> savedView(HttpServletRequest request, HttpSession session) {
        Map<String, Object> view = new LinkedHashMap<>();
        view.put("served_by", servedBy(request));
        view.put("session", session.getId());
        SavedRequest saved = (SavedRequest) session.getAttribute("SPRING_SECURITY_SAVED_REQUEST");
        if (saved != null) { // looked up in other cases: only the restored comparators find them
            view.put("saved_accept", String.join(",", saved.headers.get("ACCEPT")));
            view.put("saved_tab", saved.parameters.get("TAB")[0]);
            view.put("saved_redirect", saved.redirectUrl);
            view.put("saved_at", saved.savedAt.getTime());
        }
        Object visits = session.getAttribute("visits");
        view.put("visits", visits == null ? null : ((Map<?, ?>) visits).get("/account"));
        Object hits = session.getAttribute("hits");
        view.put("hits", hits == null ? null : ((AtomicInteger) hits).get());
        Object roles = session.getAttribute("roles");
        view.put("roles", roles == null ? null : roles.toString());
        Object listeners = session.getAttribute("listeners");
        view.put("listeners", listeners == null ? null : listeners.toString());
        view.put("queue", session.getAttribute("queue") != null);
        return view;
    }

    /** A new session id against session fixation, the Servlet 3.1 way or the older one. */
    private static HttpSession login(HttpServletRequest request, HttpSession session) {
        HttpSession loggedIn = session;
        if ("replace".equals(request.getParameter("style"))) {
            session.invalidate();
            loggedIn = request.getSession(true);
        } else {
            request.changeSessionId();
        }
        loggedIn.setAttribute("user", request.getParameter("user"));
        return loggedIn;
    }

    /** The response is written and the session changed by another thread, after the servlet returned. */
    private static void addLater(HttpServletRequest request, HttpSession session) {
        String item = request.getParameter("item");
        AsyncContext async = request.startAsync();
        async.start(() -> {
            try {
                cart(session).add(item, 1);
                send((HttpServletResponse) async.getResponse(), view(request, session));
            } catch (IOException e) {
                request.getServletContext().log("demo: the async answer failed", e);
            } finally {
                async.complete();
            }
        });
    }

    private static int quantity(HttpServletRequest request) {
        String qty = request.getParameter("qty");
        return qty == null ? 1 : Integer.parseInt(qty);
    }

    private static void big(HttpSession session, int kb) {
        if (kb <= 0) {
            session.removeAttribute("report");
            return;
        }
        byte[] report = new byte[kb * 1024];
        RANDOM.nextBytes(report); // incompressible, so the state really is this big
        session.setAttribute("report", report);
    }

    /** The body goes out (committing the headers) before the session changes. */
    private static void flushThenAdd(HttpServletRequest request, HttpServletResponse response, HttpSession session)
            throws IOException {
        response.setContentType("application/json");
        response.getWriter().write("{\"committed_first\":true,\"served_by\":\"" + servedBy(request) + "\",");
        response.flushBuffer();
        if ("logout".equals(request.getParameter("then"))) {
            session.invalidate();
            response.getWriter().write("\"logged_out\":true}\n");
            return;
        }
        cart(session).add(request.getParameter("item"), quantity(request));
        response.getWriter().write("\"session\":" + Json.of(view(request, session)) + "}\n");
    }

    /** The session as JSON, and which Tomcat answered (the proxy strips x-instance-id from what clients see). */
    static Map<String, Object> view(HttpServletRequest request, HttpSession session) {
        Map<String, Object> view = new LinkedHashMap<>();
        view.put("served_by", servedBy(request));
        view.put("session", session.getId());
        view.put("user", session.getAttribute("user"));
        view.put("items", cart(session).items());
        view.put("helper", session.getAttribute("helper") != null);
        byte[] report = (byte[]) session.getAttribute("report");
        view.put("report_bytes", report == null ? 0 : report.length);
        view.put("max_inactive", session.getMaxInactiveInterval());
        view.put("new", session.isNew());
        return view;
    }

    /** This Tomcat's connector address, e.g. 127.0.0.1:18081. */
    static String servedBy(HttpServletRequest request) {
        return request.getLocalAddr() + ":" + request.getLocalPort();
    }

    /** Reads the valve's counters the way any JMX client would. */
    private static Map<String, Object> counters() {
        MBeanServer server = ManagementFactory.getPlatformMBeanServer();
        Map<String, Object> values = new LinkedHashMap<>();
        try {
            Set<ObjectName> names = server.queryNames(new ObjectName("*:type=SessionAffinity,*"), null);
            for (ObjectName name : names) {
                for (MBeanAttributeInfo attribute : server.getMBeanInfo(name).getAttributes()) {
                    values.put(attribute.getName(), server.getAttribute(name, attribute.getName()));
                }
            }
        } catch (JMException e) {
            values.put("error", e.toString());
        }
        return values;
    }

    private static void send(HttpServletResponse response, Map<String, ?> body) throws IOException {
        response.setContentType("application/json");
        response.setCharacterEncoding("UTF-8");
        response.setHeader("Cache-Control", "no-store");
        response.getWriter().write(Json.of(body) + "\n");
    }
}
